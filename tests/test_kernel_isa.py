"""Every dot-product path this CPU can run (AVX-512 VNNI, AVX2, portable; forced lower through
``MLXTRAL_KERNEL_ISA``) against an independent NumPy reference and against each other, bit for bit;
the variable checked like every other; numba's disk cache keyed on the IR and never used by a
forced path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlxtral.backends import kernels
from mlxtral.errors import UsageError

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")

if kernels.HAVE_NUMBA:
    from mlxtral.backends import _kernels_ir as ir
HERE = Path(__file__).parent

# (qtype, out rows, in) - in/32 odd and even (the dot's tail block), T 1 (decode), 6 (dot4 + 2; AVX2's
# Q4_0 16-row dots all 6 in one pass, the other paths' Q4_0 tiles), 9 (dot4 + tail; AVX2's Q4_0 dots
# 8 + 1, the tiles 8 + 1 elsewhere): every path bit for bit against the portable one, which tiles
CASES = [("Q4_0", 37, 224), ("Q4_1", 19, 96), ("Q8_0", 41, 160), ("Q8_0", 8, 32), ("Q4_0", 5, 1024)]
TOKENS = (1, 6, 9)

_CODE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from mlxtral.backends import kernels as k, _kernels_ir as ir
import test_kernel_isa as t
got = {}
for name, w, x in t.cases():
    got[name] = k.linear(x, w)
    got[name + "_swiglu"] = k.swiglu(x, w, w)
np.savez(sys.argv[1], **got)
print(ir.ISA, ir.FORCED_GENERIC)
"""


def raw_weights(qtype: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks straight from random bytes (int8 codes down to -128, every nibble), finite scales:
    every code a file may hold, not only what a quantizer writes."""
    bsz = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = rng.integers(0, 256, (rows, n // 32, bsz), dtype=np.uint8)
    nscale = 2 if qtype == "Q4_1" else 1
    scales = (rng.standard_normal((rows, n // 32, nscale)) * 0.02).astype(np.float16)
    blocks[..., : 2 * nscale] = scales.view(np.uint8).reshape(rows, n // 32, 2 * nscale)
    return blocks.reshape(rows, -1)


def cases():
    from mlxtral.qtensor import QTensor

    rng = np.random.default_rng(13)
    for qtype, rows, n in CASES:
        for src in ("quant", "raw"):
            if src == "quant":
                wf = rng.standard_normal((rows, n)).astype(np.float32)
                data = gguf.quants.quantize(wf, gguf.GGMLQuantizationType[qtype])
            else:
                data = raw_weights(qtype, rows, n, rng)
            w = QTensor(qtype, (rows, n), data)
            for T in TOKENS:
                x = rng.standard_normal((T, n)).astype(np.float32)
                x[:, :32] *= 50.0  # one block with large values, one all zero
                x[:, 32:64] = 0.0 if n > 32 else x[:, 32:64]
                yield f"{qtype}_{rows}x{n}_{src}_T{T}", w, x


def ref_int8(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T with the activations in llama.cpp's q8 blocks (as tests/test_kernels.ref_mm), in
    float64 from ``gguf.quants``' dequantized weights."""
    sys.path.insert(0, str(HERE))
    from test_kernels import ref_mm

    return ref_mm(x, w)


def available() -> list[str]:
    return list(ir._LOWER[ir.HOST_ISA])


def run_forced(isa: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{isa}.npz"
    env = dict(os.environ, MLXTRAL_KERNEL_ISA=isa)
    env.pop("MLXTRAL_NO_AVX2", None)
    r = subprocess.run([sys.executable, "-c", _CODE, str(out), str(HERE)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got_isa, forced = r.stdout.split()
    assert got_isa == isa and forced == str(isa != ir.HOST_ISA)
    return dict(np.load(out)), isa


def test_every_path_matches_reference_and_each_other(tmp_path):
    results = [run_forced(isa, tmp_path) for isa in available()]
    assert [isa for _, isa in results][-1] == "portable"
    first, _ = results[0]
    for name, w, x in cases():
        ref = ref_int8(x, w)
        rel = np.linalg.norm(first[name] - ref) / max(np.linalg.norm(ref), 1e-30)
        assert rel < 1e-5, (name, rel)
        sw = ref / (1 + np.exp(-np.clip(ref, -80, 80))) * ref
        rel = np.linalg.norm(first[name + "_swiglu"] - sw) / max(np.linalg.norm(sw), 1e-30)
        assert rel < 1e-5, (name, rel)
    for got, isa in results[1:]:  # same integer sums, same float order: identical bits
        for k, v in first.items():
            assert np.array_equal(got[k], v), (isa, k)


def test_this_process_runs_the_best_path():
    if os.environ.get("MLXTRAL_KERNEL_ISA") or os.environ.get("MLXTRAL_NO_AVX2"):
        pytest.skip("a path is forced in this environment")
    assert ir.ISA == ir.HOST_ISA and not ir.FORCED_GENERIC


def test_best_isa_from_features():
    vnni = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    assert ir._best_isa(vnni) == "vnni"
    assert ir._best_isa(vnni - {"avx512vl"}) == "avx2"
    assert ir._best_isa({"avx2", "fma", "f16c"}) == "avx2"
    assert ir._best_isa({"avx2", "fma"}) == "portable"  # the IR's half loads need F16C
    assert ir._best_isa({"neon", "dotprod"}) == "neondot"  # ARM: tests/test_kernel_arm.py
    assert ir._best_isa({"neon"}) == "portable"
    assert ir._best_isa(set()) == "portable"


@pytest.mark.parametrize("best, want, ok", [
    ("avx2", "neondot", False), ("vnni", "neondot", False), ("neondot", "avx2", False),
    ("neondot", "vnni", False), ("neondot", "portable", True), ("neondot", "neondot", True),
    ("avx2", "portable", True), ("portable", "neondot", False),
])
def test_a_path_of_another_family_is_refused(best, want, ok, monkeypatch):
    monkeypatch.setenv("MLXTRAL_KERNEL_ISA", want)
    monkeypatch.delenv("MLXTRAL_NO_AVX2", raising=False)
    if ok:
        assert ir._chosen_isa(best) == want
    else:
        with pytest.raises(UsageError, match=f"this CPU has no {want}"):
            ir._chosen_isa(best)


def _import_kernels(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    code = "import mlxtral.backends.kernels as k, mlxtral.backends._kernels_ir as ir; print(ir.ISA)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value, expected", [
    ("sse9", "MLXTRAL_KERNEL_ISA=sse9: expected one of auto, vnni, avx2, neondot, portable"),
    ("\x1b[31mred", "MLXTRAL_KERNEL_ISA=\\x1b[31mred: expected one of"),
    ("x" * 10000, "MLXTRAL_KERNEL_ISA=xxxxxxxx"),
])
def test_bad_value_is_one_line(value, expected):
    r = _import_kernels({"MLXTRAL_KERNEL_ISA": value})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "UsageError" in last and expected in last and len(last) < 200


def test_higher_than_the_cpu_is_refused():
    """numba compiling for a CPU without VNNI (its own NUMBA_CPU_FEATURES): vnni is refused, auto
    picks avx2 from the same feature string numba keys its cache on."""
    feats = "+64bit,+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,-avx512f,-avx512vnni"
    r = _import_kernels({"MLXTRAL_KERNEL_ISA": "vnni", "NUMBA_CPU_FEATURES": feats})
    assert r.returncode != 0 and "this CPU has no vnni (the best it runs is avx2)" in r.stderr
    if ir.HOST_ISA in ("vnni", "avx2"):
        r = _import_kernels({"NUMBA_CPU_FEATURES": feats})
        assert r.returncode == 0 and r.stdout.split() == ["avx2"], r.stderr[-500:]
    r = _import_kernels({"MLXTRAL_KERNEL_ISA": "avx2", "MLXTRAL_NO_AVX2": "1"})
    assert r.returncode != 0 and "disagree" in r.stderr
    r = _import_kernels({"MLXTRAL_KERNEL_ISA": "PORTABLE", "MLXTRAL_NO_AVX2": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["portable"]


def test_disk_cache_keyed_on_the_ir():
    """The kernel modules' cache stamp carries the IR's hash (editing the IR alone invalidates
    their entries); other modules keep numba's own locator; forced paths never cache."""
    from mlxtral.backends import _kernels_nb as nb

    impl = nb.quantize_x._cache._impl
    stamp = impl.locator.get_source_stamp()
    assert isinstance(stamp, tuple) and stamp[-1] == ir.IR_HASH
    assert type(impl.locator).__name__.startswith("MlxtralIR")
    from numba.core import caching

    classes = (getattr(caching, "CacheImpl", None) or caching._CacheImpl)._locator_classes

    def elsewhere(a):
        return a + 1

    assert classes[0].from_function(elsewhere, __file__) is None
    ir.key_cache_on_ir()  # idempotent: the classes are added once
    ours = [c for c in classes if getattr(c, "_mlxtral_ir", False)]
    assert len(ours) == len(classes) - len(ours)
    assert nb._CACHE == (not ir.FORCED_GENERIC)


_DOT4_CODE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
import test_kernel_isa as t
r = t.dot_vs_dot4()
np.savez(sys.argv[1], **r)
"""


def dot_vs_dot4() -> dict:
    """Every row of ``cases()`` token by token and several tokens at a time, on the kernels
    themselves (outside any job table): Q4_1 / Q8_0 through ``dot_*`` and ``dot4_*``, Q4_0 through
    ``_kernels_tile.run_rows`` one token at a time (16-row dots where the rows lie) and all at once
    (repacked tiles, 8 + 1 tokens): {name: [2, T, rows]}."""
    import numba
    from numba import carray

    from mlxtral.backends import _kernels_ir as k
    from mlxtral.backends import _kernels_tile as tile
    from mlxtral.backends._kernels_nb import quantize_x

    fns = {q: (getattr(k, f"dot_{q.lower()}"), getattr(k, f"dot4_{q.lower()}")) for q in ("Q4_1", "Q8_0")}

    @numba.njit
    def rows(wd, xq, xd, xs, res, per_token):  # Q4_0: res [T, rows]
        T, n = xq.shape
        o = carray(k.ptr_f32(res.ctypes.data), (res.size,))
        nr = wd.shape[0]
        if per_token:
            for t in range(T):
                tile.run_rows(False, wd.ctypes.data, wd.ctypes.data, wd.shape[1], n, 1, 0, nr,
                              xq[t].ctypes.data, xd[t].ctypes.data, xs[t].ctypes.data, o[t * nr:], nr)
        else:
            tile.run_rows(False, wd.ctypes.data, wd.ctypes.data, wd.shape[1], n, T, 0, nr,
                          xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, o, nr)

    out = {}
    for name, w, x in cases():
        if x.shape[0] < k.NTOK:
            continue
        xq, xd, xs_k = quantize_x(x, k.X_OFFSET[w.qtype.lower()])  # xo, or xs for Q4_1
        wd = np.asarray(w.data)
        if w.qtype == "Q4_0":
            a = np.zeros((x.shape[0], wd.shape[0]), np.float32)
            b = np.full(a.shape, np.nan, np.float32)
            rows(wd, xq, xd, xs_k, a, True)
            rows(wd, xq, xd, xs_k, b, False)
            out[name] = np.stack([a, b])
            continue
        T4 = x.shape[0] // 4 * 4
        a = np.zeros((T4, wd.shape[0]), np.float32)
        b = np.full((T4, wd.shape[0]), np.nan, np.float32)
        dot, dot4 = fns[w.qtype]

        @numba.njit
        def one(wd, xq, xd, xs, res, dot=dot):  # res [T, rows]
            nb = xq.shape[1] // 32
            for t in range(xq.shape[0]):
                for r in range(wd.shape[0]):
                    res[t, r] = dot(wd[r].ctypes.data, xq[t].ctypes.data, xd[t].ctypes.data,
                                    xs[t].ctypes.data, nb)

        @numba.njit
        def four(wd, xq, xd, xs, res, dot4=dot4):
            nb = xq.shape[1] // 32
            for t in range(0, xq.shape[0] - 3, 4):
                for r in range(wd.shape[0]):
                    g = dot4(wd[r].ctypes.data, xq[t].ctypes.data, xd[t].ctypes.data, xs[t].ctypes.data, nb,
                             xq.shape[1], nb * 4)
                    for j in range(4):
                        res[t + j, r] = g[j]

        one(wd, xq[:T4], xd[:T4], xs_k[:T4], a)
        four(wd, xq[:T4], xd[:T4], xs_k[:T4], b)
        out[name] = np.stack([a, b])
    return out


def test_dot4_sums_as_dot_on_every_path(tmp_path):
    """``dot4_*`` (prefill, four tokens per weight block) gives bit for bit what ``dot_*`` gives each
    token alone, and Q4_0's repacked tiles what its 16-row dots give, on every path: the prefill
    may batch tokens without changing any result."""
    for isa in available():
        out = tmp_path / f"dot4_{isa}.npz"
        env = dict(os.environ, MLXTRAL_KERNEL_ISA=isa)
        env.pop("MLXTRAL_NO_AVX2", None)
        r = subprocess.run([sys.executable, "-c", _DOT4_CODE, str(out), str(HERE)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        got = dict(np.load(out))
        assert got
        for name, ab in got.items():
            assert np.array_equal(ab[0], ab[1]), (isa, name, np.abs(ab[0] - ab[1]).max())
