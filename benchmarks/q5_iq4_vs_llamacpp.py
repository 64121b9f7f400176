#!/usr/bin/env python3
"""Q5_0, Q5_1, IQ4_NL and IQ4_XS computed where they lie, against llama.cpp on its own files.

    python benchmarks/q5_iq4_vs_llamacpp.py                  # the four types and Q8_0 as a baseline
    python benchmarks/q5_iq4_vs_llamacpp.py --types iq4_xs --layers 4 --json

An F32 model of a small Mixtral shape (``shared/bench/make_moe_gguf.py --type f32``, random weights,
the real vocabulary; into ``--cache-dir``) is quantized by llama.cpp itself
(``llama_model_quantize`` of llama-cpp-python, in ``~/llamacpp/bin/python`` or
``MLXTRAL_LLAMACPP_PYTHON``) to each file type: llama.cpp's mix (the big matrices in the type,
``output`` and some ``attn_v`` one step up, as llama-quantize does). Then the teacher-forced logits of
one token sequence from llama.cpp (``shared/bench/llamacpp_logits.py``) and from our NumPy backend
(int8 activations as llama.cpp: q8_0 for Q5_0 / IQ4_NL, q8_1 for Q5_1, q8_K for IQ4_XS and the
K-quants), per position; Q8_0 gives the scale of what two int8 implementations differ by.
Prints one line per type (``--json``: one object).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "bench"
LLAMA_PY = Path(os.environ.get("MLXTRAL_LLAMACPP_PYTHON") or Path.home() / "llamacpp" / "bin" / "python")
FTYPES = {"q8_0": 7, "q5_0": 8, "q5_1": 9, "iq4_nl": 25, "iq4_xs": 30}  # llama_ftype LLAMA_FTYPE_MOSTLY_*
QUANTIZE = r"""
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="q8_0,q5_0,q5_1,iq4_nl,iq4_xs")
    p.add_argument("--cache-dir", default="/tmp/mlxtral-q5iq4")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    import mlxtral

    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    shape = ["--dim", str(a.dim), "--ffn", str(a.ffn), "--layers", str(a.layers), "--experts", str(a.experts),
             "--heads", "8", "--kv-heads", "2"]
    tag = f"d{a.dim}-f{a.ffn}-L{a.layers}-e{a.experts}"
    f32 = cache / f"moe-{tag}.f32.gguf"
    if not f32.exists():
        run([sys.executable, str(SHARED / "make_moe_gguf.py"), str(f32), "--type", "f32", *shape])
    ids = [1, *np.random.default_rng(0).integers(3, 32000, a.tokens - 1).tolist()]
    out: dict[str, dict] = {}
    for t in a.types.split(","):
        q = cache / f"moe-{tag}.{t}.gguf"
        if not q.exists():
            run([str(LLAMA_PY), "-c", QUANTIZE, str(f32), str(q), str(FTYPES[t])])
        ref_path = cache / f"moe-{tag}.{t}.llamacpp.npy"
        run([str(LLAMA_PY), str(SHARED / "llamacpp_logits.py"), str(q), str(ref_path),
             "--ids", ",".join(map(str, ids))])
        ref = np.load(ref_path)
        m = mlxtral.load(q, backend="numpy", tokenizer=False, max_context=len(ids))
        got = m.logits(ids)
        types: dict[str, int] = {}
        for ten in m.checkpoint.tensors.values():
            types[ten.qtype] = types.get(ten.qtype, 0) + 1
        diff = np.abs(got - ref)
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        out[t] = {"tensor_types": types, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                  "logit_std": float(ref.std()), "argmax_agree": agree}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for t, r in out.items():
            print(f"{t:7s} max |diff| {r['max_abs']:.4f}  mean {r['mean_abs']:.5f}  "
                  f"logit std {r['logit_std']:.3f}  argmax agree {r['argmax_agree']:.3f}  "
                  f"types {r['tensor_types']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
