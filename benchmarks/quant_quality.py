#!/usr/bin/env python3
"""What each quantization costs: KL divergence against the F32 model, ours beside llama.cpp's.

    python benchmarks/quant_quality.py                    # bench model, 4 chunks of 512
    python benchmarks/quant_quality.py --chunks 8 --json

For the F32 bench model (``shared/bench/make_moe_gguf.py --type f32``, random weights) every type is
written twice from the same F32 file: by ``mlxtral convert`` and by llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize`` through ``~/llamacpp/bin/python`` or
``MLXTRAL_LLAMACPP_PYTHON``). Both files are then scored by the same engine (``mlxtral perplexity
--kl-divergence`` against the F32 model's log-probabilities, llama-perplexity's protocol), so the
columns differ only by the quantizer: file size, mean KLD, 99th percentile, top-token agreement.
The text is Python's own ``pydoc_data.topics`` (``python -m mlxtral.evaluation.sample_text``).

Note: llama.cpp's Q4_0/Q4_1/Q8_0 files keep ``output.weight`` at Q6_K and ours at Q8_0 (4-bit
bodies) or Q8_0 (rows not a multiple of 256 everywhere): the K-quant mixes are the same tensor
types on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
MAKER = HERE.parents[2] / "shared" / "bench" / "make_moe_gguf.py"
LLAMA_PY = Path(os.environ.get("MLXTRAL_LLAMACPP_PYTHON") or Path.home() / "llamacpp" / "bin" / "python")
MLXTRAL = [sys.executable, "-m", "mlxtral.cli"]
# our convert flag, llama.cpp's llama_ftype
TYPES = {"Q8_0": ("--q8", 7), "Q4_0": ("--q4", 2), "Q4_1": ("--q4_1", 3), "Q4_K_M": ("--q4_k_m", 15),
         "Q3_K_M": ("--q3_k_m", 12), "Q2_K": ("--q2_k", 10)}
_QUANTIZE = ("import sys, llama_cpp as L\n"
             "p = L.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); p.nthread = 2\n"
             "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def run(cmd: list[str], **kw: object) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def kld(model: Path, base: Path, text: Path, chunks: int) -> dict:
    out = run(MLXTRAL + ["perplexity", str(model), "-f", str(text), "--kl-divergence-base", str(base),
                         "--kl-divergence", "--chunks", str(chunks), "--json"])
    d = json.loads(out.strip().splitlines()[-1])
    o = d["overall"]
    return {"kld": o["kld"]["mean"], "kld_stderr": o["kld"]["stderr"], "kld_99": o["kld"].get("p99"),
            "same_top": o["same_top"], "ppl": o["ppl"], "ppl_ratio": o["ppl_ratio"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/mlxtral-quality"))
    p.add_argument("--f32", type=Path, help="the F32 source (default: build the bench model)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    f32 = a.f32 or a.dir / "moe-f32.gguf"
    if not f32.exists():
        run([sys.executable, str(MAKER), str(f32), "--type", "f32"])
    text = a.dir / "topics.txt"
    run([sys.executable, "-m", "mlxtral.evaluation.sample_text", str(text)])
    base = a.dir / f"f32-{a.chunks}.kld"
    if not base.exists():
        run(MLXTRAL + ["perplexity", str(f32), "-f", str(text), "--chunks", str(a.chunks),
                       "--kl-divergence-base", str(base), "--json"])
    rows = []
    for t in a.types.split(","):
        flag, ftype = TYPES[t]
        ours, theirs = a.dir / f"ours-{t}.gguf", a.dir / f"llamacpp-{t}.gguf"
        if not ours.exists():
            run(MLXTRAL + ["convert", str(f32), str(ours), flag])
        if not theirs.exists():
            run([str(LLAMA_PY), "-c", _QUANTIZE, str(f32), str(theirs), str(ftype)])
        for who, f in (("mlxtral", ours), ("llama.cpp", theirs)):
            r = {"type": t, "quantizer": who, "size_mb": f.stat().st_size / 1e6}
            r.update(kld(f, base, text, a.chunks))
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps({"f32": str(f32), "chunks": a.chunks, "rows": rows}))
        return 0
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"KL divergence against F32 ({a.chunks} chunks of 512, the same engine scores both)")
    for c in ("type", "quantizer", "file MB", "mean KLD", "KLD 99%", "same top token", "PPL ratio"):
        tab.add_column(c, justify="left" if c in ("type", "quantizer") else "right")
    for r in rows:
        kl = f"{r['kld']:.5f} ± {r['kld_stderr']:.5f}"
        tab.add_row(r["type"], r["quantizer"], f"{r['size_mb']:.0f}", kl,
                    f"{r['kld_99']:.4f}" if r["kld_99"] is not None else "-", f"{100 * r['same_top']:.2f}%",
                    f"{r['ppl_ratio']:.4f}")
    Console(width=140).print(tab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
