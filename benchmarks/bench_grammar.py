#!/usr/bin/env python3
"""Constrained decoding libraries on mlxtral's tokenizers: llguidance (what `mlxtral serve` uses)
against xgrammar, when installed.

    python benchmarks/bench_grammar.py MODEL.gguf [MODEL2.gguf ...]

Per library and tokenizer: the one-time vocabulary setup, compiling a JSON schema, and the token
mask per step (median and max) while walking the tokens of a document that matches the schema;
both must accept every token of it. xgrammar is optional (``pip install xgrammar``; it needs torch).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
DOC = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"],
       "address": {"city": "London", "zip": "W1"}}


def llguidance_run(tok: Any, ids: list[int]) -> dict[str, Any]:
    from mlxtral.server import grammar

    grammar._tokenizers.clear()
    t0 = time.perf_counter()
    grammar.ll_tokenizer(tok)
    t1 = time.perf_counter()
    g = grammar.schema_grammar(SCHEMA)
    c = grammar.Constraint(tok, g)
    t2 = time.perf_counter()
    times, x = [], np.zeros(tok.vocab_size, dtype=np.float32)
    for i in ids:
        s = time.perf_counter()
        m = c.mask(x)
        times.append(time.perf_counter() - s)
        assert np.isfinite(m[i]), f"llguidance refused token {i}"
        c.consume(i)
    return {"setup_s": t1 - t0, "compile_s": t2 - t1, "mask_ms_median": 1e3 * statistics.median(times),
            "mask_ms_max": 1e3 * max(times)}


def xgrammar_run(tok: Any, ids: list[int]) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eos_ids), add_prefix_space=False)
    comp = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(SCHEMA))
    m = xgr.GrammarMatcher(cg)
    t2 = time.perf_counter()
    bm = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for i in ids:
        s = time.perf_counter()
        m.fill_next_token_bitmask(bm)
        x = torch.zeros(1, tok.vocab_size)
        xgr.apply_token_bitmask_inplace(x, bm)
        times.append(time.perf_counter() - s)
        assert torch.isfinite(x[0, i]), f"xgrammar refused token {i}"
        assert m.accept_token(i)
    return {"setup_s": t1 - t0, "compile_s": t2 - t1, "mask_ms_median": 1e3 * statistics.median(times),
            "mask_ms_max": 1e3 * max(times)}


def main() -> None:
    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.tokenizer import load_tokenizer

    for path in sys.argv[1:]:
        from pathlib import Path

        tok = load_tokenizer(open_checkpoint(Path(path)).tokenizer)
        from mlxtral.server.grammar import _Vocab

        ids = _Vocab(tok)(json.dumps(DOC))  # byte-exact (no SentencePiece leading space)
        for name, fn in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run)):
            try:
                r = fn(tok, ids)
            except ImportError as e:
                r = {"skipped": str(e)}
            except AssertionError as e:
                r = {"failed": str(e)}
            r = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
            print(json.dumps({"model": Path(path).name, "tokenizer": tok.kind, "vocab": tok.vocab_size,
                              "library": name, "tokens": len(ids), **r}), flush=True)


if __name__ == "__main__":
    main()
