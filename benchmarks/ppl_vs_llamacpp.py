#!/usr/bin/env python3
"""Our perplexity vs llama-perplexity's protocol computed through llama-cpp-python, same file, same text.

    python benchmarks/ppl_vs_llamacpp.py MODEL.gguf -f TEXT [--ctx 512] [--chunks 20] [--json]
    python -m mlxtral.evaluation.sample_text /tmp/topics.txt    # the text, if you have none

llama.cpp side (in ``~/llamacpp/bin/python`` or ``$MLXTRAL_LLAMACPP_PYTHON``, this file run with
``--llama-worker``): the text read as ``-f`` reads it (one trailing newline dropped), tokenized by
llama.cpp (BOS where its vocabulary adds it), ``n_chunks = floor(n_tokens / ctx)`` (capped by
``--chunks``); each chunk evaluated from an empty KV cache by ``Llama(model, n_ctx=ctx, n_batch=ctx,
logits_all=True)`` with BOS in place of its first token where the vocabulary adds BOS, and the
logits at positions ctx/2 .. ctx-2 scoring the next token (exp in float32, sums in float64), as
``tools/perplexity/perplexity.cpp``. Our side: ``mlxtral.evaluation.perplexity`` in this process.

Printed: both PPLs and their standard errors, the ratio, chunks and scored tokens (must be equal),
whether the two tokenizations are equal, the largest per-chunk difference of mean NLL.
Target (issue 14): |ratio - 1| <= 0.5%.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
LLAMA_PY = Path(os.environ.get("MLXTRAL_LLAMACPP_PYTHON") or Path.home() / "llamacpp" / "bin" / "python")


def read_text(path: str) -> bytes:
    data = Path(path).read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def nll_rows(logits, targets):  # float32 [n, V], int [n] -> float64 [n], as llama.cpp's log_softmax
    import numpy as np

    d = logits - logits.max(axis=1, keepdims=True)
    s = np.exp(d).sum(axis=1, dtype=np.float64)
    return np.log(s) - d[np.arange(len(targets)), targets].astype(np.float64)


# ---- llama.cpp (runs under llama-cpp-python's interpreter) -----------------------------------------
def llama_worker(model: str, text: str, ctx: int, chunks: int | None, threads: int,
                 no_extra_bufts: bool = True, kv: str = "default") -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    if no_extra_bufts:  # what llama.cpp's --no-repack sets: no repacked / AMX copies of the weights
        default_params = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            mp = default_params()
            mp.use_extra_bufts = False
            return mp
        llama_cpp.llama_cpp.llama_model_default_params = params  # what Llama() calls

    kv_type = {"default": {}, "f16": {"type_k": 1, "type_v": 1}, "f32": {"type_k": 0, "type_v": 0}}[kv]
    llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False, **kv_type)
    bos = int(llm.token_bos())
    add_bos = bool(llm._model.add_bos_token())  # llama_vocab_get_add_bos
    # add_bos=True is llama_tokenize's add_special: BOS only where the vocabulary adds it
    tokens = llm.tokenize(read_text(text), add_bos=True, special=False)
    n_vocab = llm.n_vocab()
    if len(tokens) < 2 * ctx:
        return {"error": f"{len(tokens)} tokens, need {2 * ctx}"}
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    per_chunk = []
    t0 = time.perf_counter()
    for i in range(n_chunks):
        ids = list(tokens[i * ctx:(i + 1) * ctx])
        if add_bos:
            ids[0] = bos
        llm.reset()  # n_tokens = 0: eval() removes every cached position first (a fresh KV cache)
        llm.eval(ids)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float32).reshape(ctx, n_vocab)
        targets = np.asarray(tokens[i * ctx + first + 1:(i + 1) * ctx], dtype=np.int64)
        nll = nll_rows(logits[first:ctx - 1], targets)
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.size
        per_chunk.append(float(nll.mean()))
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": math.sqrt(var / (count - 1)) * ppl if var > 0 else 0.0,
            "chunks": n_chunks, "tokens_scored": count, "n_tokens": len(tokens), "add_bos": add_bos,
            "nll_per_chunk": per_chunk, "tokens": [int(t) for t in tokens],
            "seconds": time.perf_counter() - t0,
            "llama_cpp_version": getattr(llama_cpp, "__version__", "?")}


# ---- ours ------------------------------------------------------------------------------------------
def ours(model: str, text: str, ctx: int, chunks: int | None, threads: int, backend: str,
         tokens: list[int] | None = None, kv: str = "default") -> dict:
    import mlxtral
    from mlxtral.backends.kernels import set_num_threads
    from mlxtral.evaluation.perplexity import read_text as read_text_ours

    set_num_threads(threads)
    kv_dtype = {"default": None, "f16": "float16", "f32": "float32"}[kv]
    m = mlxtral.load(model, backend=backend, kv_dtype=kv_dtype)
    tokens = m.encode(read_text_ours(text)) if tokens is None else tokens
    r = m.perplexity(tokens, ctx=ctx, chunks=chunks)
    d = r.as_dict()
    d["tokens"] = tokens
    d["backend"] = m.backend_name
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("-f", "--file", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kv", choices=("default", "f16", "f32"), default="default",
                   help="KV cache type on both sides (default: each engine's own: ours float32, "
                   "llama.cpp f16)")
    p.add_argument("--extra-bufts", action="store_true",
                   help="let llama.cpp use its extra buffer types (repacked and AMX weights); off by "
                   "default: a build with AMX faulted (SIGSEGV in ggml_backend_amx_mul_mat) on the dev VM")
    p.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_worker:
        print(json.dumps(llama_worker(a.model, a.file, a.ctx, a.chunks, a.threads, not a.extra_bufts, a.kv)))
        return 0
    if not LLAMA_PY.exists():
        print(f"no llama-cpp-python interpreter at {LLAMA_PY} (set MLXTRAL_LLAMACPP_PYTHON)", file=sys.stderr)
        return 1
    cmd = [str(LLAMA_PY), str(HERE), a.model, "-f", a.file, "--ctx", str(a.ctx), "--threads", str(a.threads),
           "--llama-worker", "--kv", a.kv] + (["--chunks", str(a.chunks)] if a.chunks else []) + (
               ["--extra-bufts"] if a.extra_bufts else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    ll = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in ll:
        print(f"llama.cpp: {ll['error']}", file=sys.stderr)
        return 1
    t_ll = time.perf_counter() - t0
    me = ours(a.model, a.file, a.ctx, a.chunks, a.threads, a.backend, kv=a.kv)
    same_tokens = me["tokens"] == ll["tokens"]
    first_diff = None
    if not same_tokens:
        pairs = enumerate(zip(me["tokens"], ll["tokens"], strict=False))
        first_diff = next((i for i, (x, y) in pairs if x != y), min(len(me["tokens"]), len(ll["tokens"])))
    diffs = [abs(x - y) for x, y in zip(me["nll_per_chunk"], ll["nll_per_chunk"], strict=False)]
    out = {
        "model": a.model, "text": a.file, "ctx": a.ctx, "backend": me["backend"], "threads": a.threads,
        "kv": a.kv,
        "ppl_mlxtral": me["ppl"], "ppl_stderr_mlxtral": me["ppl_stderr"],
        "ppl_llama_cpp": ll["ppl"], "ppl_stderr_llama_cpp": ll["ppl_stderr"],
        "ratio": me["ppl"] / ll["ppl"],
        "chunks": [me["chunks"], ll["chunks"]], "tokens_scored": [me["tokens_scored"], ll["tokens_scored"]],
        "n_tokens": [me["n_tokens"], ll["n_tokens"]], "add_bos": [me["add_bos"], ll["add_bos"]],
        "same_tokens": same_tokens, "first_token_difference": first_diff,
        "max_chunk_mean_nll_diff": max(diffs) if diffs else None,
        "seconds": {"mlxtral": me["seconds"], "llama_cpp": ll["seconds"], "llama_cpp_process": t_ll},
        "ppl_mlxtral_on_llama_tokens": None if same_tokens else ours(
            a.model, a.file, a.ctx, a.chunks, a.threads, a.backend, tokens=ll["tokens"], kv=a.kv)["ppl"],
        "within_0_5_percent": abs(me["ppl"] / ll["ppl"] - 1) <= 0.005,
        "counts_equal": me["chunks"] == ll["chunks"] and me["tokens_scored"] == ll["tokens_scored"],
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{Path(a.model).name}  ctx {a.ctx}  ({out['backend']}, {a.threads} threads, KV cache {a.kv})")
        print(f"  mlxtral  : PPL {me['ppl']:.4f} ± {me['ppl_stderr']:.4f}  chunks {me['chunks']}  "
              f"scored {me['tokens_scored']}  tokens {me['n_tokens']}  bos {me['add_bos']}  "
              f"{me['seconds']:.1f} s")
        print(f"  llama.cpp: PPL {ll['ppl']:.4f} ± {ll['ppl_stderr']:.4f}  chunks {ll['chunks']}  "
              f"scored {ll['tokens_scored']}  tokens {ll['n_tokens']}  bos {ll['add_bos']}  "
              f"{ll['seconds']:.1f} s")
        print(f"  ratio {out['ratio']:.5f} ({100 * (out['ratio'] - 1):+.3f}%)  same tokens: {same_tokens}"
              + (f" (first difference at {first_diff})" if first_diff is not None else "")
              + f"  max |chunk mean NLL diff| {out['max_chunk_mean_nll_diff']:.5f}"
              + f"  -> {'OK' if out['within_0_5_percent'] and out['counts_equal'] else 'FAIL'}")
        if not same_tokens:
            print(f"  mlxtral on llama.cpp's tokens: PPL {out['ppl_mlxtral_on_llama_tokens']:.4f}")
    return 0 if out["within_0_5_percent"] and out["counts_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
