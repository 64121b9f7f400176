"""The kernels' native library (mlxtral.backends.aot): built once by the precompile child, loaded
without numba, the same bits as numba's JIT, and every way it can be missing or wrong falls back
to the JIT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, raw_gguf_tensors, tiny_args, write_gguf, write_raw_gguf

from mlxtral.backends import aot, kernels

pytestmark = [
    pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="no numba: no kernels to compile"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measured on Linux"),
]

# logits of a prompt, its decode, the numba modules loaded, the library's misses
_RUN = """
import json, sys
import numpy as np
import mlxtral
from mlxtral.backends import aot, kernels
m = mlxtral.load(sys.argv[1], backend="numpy")
be = m.backend
c = be.new_cache(64)
out = [be.forward(list(range(1, 20)), c, all_logits=True)]
out += [be.forward([t], c)[None] for t in (5, 6, 7)]
caches = [be.new_cache(64) for _ in range(2)]  # a server's steps: prompts, then a token each
out.append(be.forward_runs([[1, 2, 3], [1, 9]], caches))
out.append(be.forward_runs([[4], [5]], caches))
m.generate("Hello", max_tokens=4, temperature=1.0, seed=3)  # the sampler, the chat path
np.save(sys.argv[2], np.concatenate(out))
print(json.dumps({"native": kernels.NATIVE is not None, "numba": "numba" in sys.modules,
                  "llvmlite": "llvmlite" in sys.modules, "misses": sorted(aot.misses)}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLXTRAL_KERNEL_ISA", "MLXTRAL_NO_AVX2",
                                                             "MLXTRAL_NO_NUMBA", "MLXTRAL_NO_AOT")}
    return {**env, **extra}


def _run(model: Path, out: Path, **env: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _RUN, str(model), str(out)], capture_output=True, text=True,
                       timeout=1200, env=_env(**env), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("aot")
    args = tiny_args()
    f32 = write_gguf(d / "f32.gguf", random_weights(args, 0), args)
    kargs = tiny_args(dim=256, hidden_dim=256, head_dim=64)  # whole 256-superblocks
    kq = write_raw_gguf(d / "q4k.gguf", raw_gguf_tensors(kargs, {"ffn_down": "Q6_K", "*": "Q4_K"}), kargs,
                        vocab=True)
    q40 = write_raw_gguf(d / "q40.gguf", raw_gguf_tensors(args, "Q4_0"), args, vocab=True)
    _run(f32, d / "first.npy")  # a first run after a change builds the library (and ran on numba)
    return [f32, kq, q40]


def test_the_library_runs_without_numba_and_gives_the_jits_bits(models: list[Path], tmp_path: Path) -> None:
    for i, model in enumerate(models):
        native = _run(model, tmp_path / f"n{i}.npy")
        jit = _run(model, tmp_path / f"j{i}.npy", MLXTRAL_NO_AOT="1")
        assert native == {"native": True, "numba": False, "llvmlite": False, "misses": []}, model.name
        assert jit["native"] is False and jit["numba"] is True
        a, b = np.load(tmp_path / f"n{i}.npy"), np.load(tmp_path / f"j{i}.npy")
        assert np.array_equal(a, b), (model.name, float(np.abs(a - b).max()))


def test_a_forced_isa_or_no_aot_runs_the_jit(models: list[Path], tmp_path: Path) -> None:
    assert _run(models[0], tmp_path / "a.npy", MLXTRAL_KERNEL_ISA="portable")["native"] is False
    assert _run(models[0], tmp_path / "b.npy", MLXTRAL_NO_AOT="1")["native"] is False


def _values() -> list:
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    ro = a.copy()
    ro.setflags(write=False)
    unaligned = np.frombuffer(b"\0" + a.tobytes(), dtype=np.uint8)[1:].view(np.float32)
    return [a, a.T, a[:, ::2], ro, a[0], np.zeros(3, np.int16), np.zeros((2, 2), np.float16), unaligned,
            np.zeros(0, np.uint8), 3, 2.5, True, np.int32(4), np.float32(1), np.bool_(False), (a, 1, 2.0),
            (1, 2, 3), (), ((a, 1), (a, 2))]


@pytest.mark.parametrize("i", range(len(_values())))
def test_call_types_are_keyed_as_numba_types_them(i: int) -> None:
    import numba

    from mlxtral.backends.aot_build import numba_key

    v = _values()[i]
    assert aot.type_key(v) == numba_key(numba.typeof(v))


def test_a_call_no_export_takes_goes_to_numba() -> None:
    entry = aot.Entry("_kernels_nb", "spin_pauses", {})  # as if the build had seen no such call
    before = set(aot.misses)
    entry(10)
    assert aot.misses - before == {"_kernels_nb.spin_pauses"}
    aot.misses.discard("_kernels_nb.spin_pauses")


def test_a_library_for_another_key_or_a_bad_manifest_is_not_loaded(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXTRAL_KERNEL_DIR", str(tmp_path))
    for k in ("MLXTRAL_NO_AOT", "MLXTRAL_KERNEL_ISA", "MLXTRAL_NO_NUMBA"):
        monkeypatch.delenv(k, raising=False)
    lib, man, _ = aot.paths()
    lib.write_bytes(b"\x7fELF not really")
    for text in ("{", json.dumps({"format": aot.FORMAT, "key": "someone-else"}), "[]", "x" * 100,
                 "[" * 100000 + "]" * 100000):
        man.write_text(text)
        monkeypatch.setattr(aot, "_library", None)
        assert aot.load(retry=True) is None
    man.write_text(json.dumps({"format": aot.FORMAT, "key": aot.library_key(), "modules": {}}))
    monkeypatch.setattr(aot, "_library", None)
    assert aot.load(retry=True) is None  # not an extension module: the JIT runs


def test_the_key_follows_the_sources_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    k = aot.library_key()
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert aot.library_key() != k
    monkeypatch.delenv("NUMBA_CPU_NAME")
    monkeypatch.setattr(aot, "_cpu_identity", lambda: "another cpu")
    assert aot.library_key() != k


def test_a_failed_build_is_noted_and_the_next_run_is_not_cold(tmp_path: Path) -> None:
    code = ("import mlxtral.backends.aot_build as b, mlxtral.backends.aot as a\n"
            "b.toolchain_ready = lambda: False\n"
            "print(b.build_or_note(), repr(a.failure()))\n"
            "from mlxtral.backends.precompile import is_cold; print(is_cold())")
    env = _env(MLXTRAL_KERNEL_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    first, cold = r.stdout.strip().splitlines()[-2:]
    assert first.startswith("None 'RuntimeError: no C compiler")
    assert cold in ("True", "False")  # cold only if numba's own cache is (never the library again)
    assert not list(tmp_path.glob("*.so"))


def test_a_manifest_of_another_build_is_not_loaded(models: list[Path], tmp_path: Path) -> None:
    lib = aot.load(retry=True)  # (the models fixture's first run built it)
    if lib is None:
        pytest.skip("no native library in this process")
    _, man, _ = aot.paths()
    code = "from mlxtral.backends import aot; print(aot.load() is not None)"
    seen = []
    for bump in (0, 1):
        d = tmp_path / str(bump)
        d.mkdir()
        (d / lib.path.name).write_bytes(lib.path.read_bytes())
        manifest = json.loads(man.read_text())
        manifest["build_id"] += bump
        (d / man.name).write_text(json.dumps(manifest))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=_env(MLXTRAL_KERNEL_DIR=str(d)))
        assert r.returncode == 0, r.stderr[-2000:]
        seen.append(r.stdout.strip())
    assert seen == ["True", "False"]


def test_a_build_removes_only_its_own_stale_libraries(tmp_path: Path) -> None:
    from mlxtral.backends.aot_build import _remove_stale

    key, old = "a" * 20, "b" * 20
    names = [f"mlxtral_kernels_{old}.json", f"mlxtral_kernels_{old}.cpython-311-x86_64-linux-gnu.so",
             f"mlxtral_kernels_{old}.failed", f"mlxtral_kernels_{key}.json", "mlxtral_kernels_notes.txt",
             f"mlxtral_kernels_{old}.json.bak", "model.gguf"]
    for n in names:
        (tmp_path / n).write_text("x")
    _remove_stale(tmp_path, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


def test_the_builder_runs_numbas_own_and_builds_nothing_from_nothing(tmp_path: Path) -> None:
    """The precompile child runs the JIT's kernels even where a library exists (a library built
    from a run of the library would export nothing), and a build with no compiled kernel fails."""
    code = ("from mlxtral.backends import aot, kernels, aot_build\n"
            "print(aot.load() is None, kernels.describe()[0])\n"
            "try:\n    aot_build.build()\nexcept RuntimeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=_env(MLXTRAL_KERNEL_DIR=str(tmp_path), MLXTRAL_AOT_BUILDING="1",
                                MLXTRAL_NO_PRECOMPILE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["True numba", "no kernel was compiled in this process"]
    assert not list(tmp_path.glob("*.so"))
