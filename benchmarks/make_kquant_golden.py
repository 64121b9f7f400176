#!/usr/bin/env python3
"""Our K-quant quantizers (mlxtral.quant.kquants) against llama.cpp's, and the CI golden fixture.

    python benchmarks/make_kquant_golden.py                   # compare, then write the fixture
    python benchmarks/make_kquant_golden.py --blocks 20000 --no-write --json

Needs llama.cpp's ggml: ``libggml-base.so`` of llama-cpp-python (``--lib``, default: found under
``~/llamacpp/lib/python3*/site-packages/llama_cpp/lib/`` or ``$MLXTRAL_GGML_BASE``), called with
ctypes: ``ggml_quantize_chunk(type, src, dst, 0, nrows, 256, imatrix=NULL)``, which for the
K-quants runs ``quantize_row_q*_K_ref`` (what ``llama-quantize`` does without an imatrix).

1. Comparison: ``--blocks`` super-blocks (256 weights) of each of random normal, heavy-tailed
   (Student t, 2 degrees of freedom), weight-like (normal with per-row scales 2^-12..2^6 and a few
   10x outlier columns) and Cauchy data (NumPy Generator, ``--seed``), the fixture's inputs, and
   ``--blocks / 10`` normal blocks with scattered NaN, +-inf and +-3.4e38 (meaningless blocks, but
   the bytes should still match).
   Per type: share of byte-identical blocks, blocks that differ, of those how many have a larger
   squared error with our bytes than with llama.cpp's (dequantized with gguf.quants), relative
   RMSE of both, and both quantizers' speed (MB/s of float32 input, one thread).
2. Fixture (unless ``--no-write``): ``tests/data/kquant_golden.npz`` with llama.cpp's bytes for
   ``tests/kquant_inputs.golden_inputs()`` (96 random normal, 96 heavy-tailed, 96 weight-like and
   40 adversarial super-blocks, built from integer hashing so every machine makes the same floats;
   their SHA-256 is stored too), one uint8 ``[328, type_size]`` array per type. The test
   ``tests/test_kquants.py`` checks our bytes against it without llama.cpp.

Exit status 1 if a type is below 99.9% identical blocks or any differing block is worse.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kquant_inputs import digest, golden_inputs  # noqa: E402

from mlxtral.quant.kquants import BLOCK_BYTES, KQUANT_TYPES, QK_K, quantize_blocks  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "kquant_golden.npz"
GGML_TYPE_IDS = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # enum ggml_type


def find_lib(explicit: str | None) -> Path:
    cands = [explicit, os.environ.get("MLXTRAL_GGML_BASE")]
    site = Path.home() / "llamacpp" / "lib" / "python3*" / "site-packages"
    cands += sorted(glob.glob(str(site / "llama_cpp" / "lib" / "libggml-base.so")))
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit("libggml-base.so not found: pass --lib or set MLXTRAL_GGML_BASE")


class GGML:
    """ctypes binding of ``ggml_quantize_chunk``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        f = lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]
        self._f = f

    def quantize(self, x: np.ndarray, qtype: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)  # [n, 256]
        out = np.zeros((x.shape[0], BLOCK_BYTES[qtype]), np.uint8)
        n = self._f(GGML_TYPE_IDS[qtype], x.ctypes.data, out.ctypes.data, 0, x.shape[0], QK_K, None)
        assert n == out.nbytes, (n, out.nbytes)
        return out

    def version(self) -> str:
        dist = sorted(self.path.parents[2].glob("llama_cpp_python-*.dist-info"))
        return dist[-1].name.removesuffix(".dist-info") if dist else str(self.path)


def ours(x: np.ndarray, qtype: str) -> np.ndarray:
    out = np.empty((x.shape[0], BLOCK_BYTES[qtype]), np.uint8)
    quantize_blocks(x, qtype, out)
    return out


def block_sq_err(x: np.ndarray, blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float64 [n]: squared error of each dequantized super-block against x [n, 256]."""
    import gguf

    with np.errstate(all="ignore"):
        d = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(-1, QK_K)
        return ((d.astype(np.float64) - x.astype(np.float64)) ** 2).sum(axis=1)


def datasets(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, QK_K))
    w *= np.exp2(rng.integers(-12, 7, n))[:, None]
    w[:, rng.integers(0, QK_K, 6)] *= 10.0
    bad = rng.standard_normal((max(1, n // 10), QK_K)).astype(np.float32)  # NaN, inf, float32 max
    for k, v in enumerate((np.nan, np.inf, -np.inf, 3.4e38, -3.4e38)):
        bad.reshape(-1)[rng.integers(0, bad.size, max(1, bad.shape[0] // (k + 1)))] = v
    return {
        "non-finite": bad,
        "normal": rng.standard_normal((n, QK_K)).astype(np.float32),
        "student-t2": rng.standard_t(2, (n, QK_K)).astype(np.float32),
        "weight-like": w.astype(np.float32),
        "cauchy": rng.standard_cauchy((n, QK_K)).astype(np.float32),
        "golden+adversarial": golden_inputs(),
    }


def timed(fn, *args) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t0


def compare(ggml: GGML, sets: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for qtype in KQUANT_TYPES:
        ours(sets["normal"][:64], qtype)  # compile / load the numba cache outside the timing
        eq = differ = worse = 0
        n_all = 0
        t_o = t_r = 0.0
        nbytes = 0
        per_set = {}
        for name, x in sets.items():
            r, dt_r = timed(ggml.quantize, x, qtype)
            o, dt_o = timed(ours, x, qtype)
            same = (r == o).all(axis=1)
            er = block_sq_err(x, r, qtype)
            eo = block_sq_err(x, o, qtype)
            bad = ~same
            w = int((eo[bad] > er[bad]).sum())
            eq += int(same.sum())
            differ += int(bad.sum())
            worse += w
            n_all += len(same)
            fin = np.isfinite(er) & np.isfinite(eo)  # fp16 overflow of d (|x| > ~4e6): inf/NaN blocks
            den = float((x[fin].astype(np.float64) ** 2).sum())
            t_o += dt_o
            t_r += dt_r
            nbytes += x.nbytes
            per_set[name] = {"blocks": len(same), "identical_pct": 100.0 * float(same.mean()),
                             "differ": int(bad.sum()), "worse": w,
                             "nonfinite_blocks": int((~fin).sum()),
                             "rel_rmse_ours": float(np.sqrt(eo[fin].sum() / den)),
                             "rel_rmse_llamacpp": float(np.sqrt(er[fin].sum() / den))}
        rows.append({
            "type": qtype, "blocks": n_all, "identical_pct": 100.0 * eq / n_all, "differ": differ,
            "worse": worse, "rel_rmse_ours": per_set["normal"]["rel_rmse_ours"],
            "rel_rmse_llamacpp": per_set["normal"]["rel_rmse_llamacpp"],
            "mbps_ours": nbytes / 1e6 / t_o, "mbps_llamacpp": nbytes / 1e6 / t_r, "sets": per_set,
        })
    return rows


def write_fixture(ggml: GGML) -> Path:
    x = golden_inputs()
    arrays = {qtype: ggml.quantize(x, qtype) for qtype in KQUANT_TYPES}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, inputs_sha256=np.array(digest(x)), source=np.array(ggml.version()),
                        **arrays)
    return FIXTURE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", help="path of llama.cpp's libggml-base.so")
    ap.add_argument("--blocks", type=int, default=4000, help="super-blocks per random data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="compare only, leave the fixture alone")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = ap.parse_args()
    ggml = GGML(find_lib(a.lib))
    rows = compare(ggml, datasets(a.blocks, a.seed))
    fixture = None if a.no_write else str(write_fixture(ggml).relative_to(ROOT))
    ok = all(r["identical_pct"] >= 99.9 and r["worse"] == 0 for r in rows)
    if a.json:
        print(json.dumps({"llamacpp": ggml.version(), "fixture": fixture, "ok": ok, "results": rows,
                          "loadavg": os.getloadavg()}, indent=1))
        return 0 if ok else 1
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"K-quants: mlxtral vs llama.cpp ({ggml.version()}), {rows[0]['blocks']} super-blocks")
    for c in ("type", "identical", "differ", "worse", "RMSE ours", "RMSE llama", "MB/s ours", "MB/s llama"):
        t.add_column(c, justify="left" if c == "type" else "right")
    for r in rows:
        t.add_row(r["type"], f"{r['identical_pct']:.3f}%", str(r["differ"]), str(r["worse"]),
                  f"{r['rel_rmse_ours']:.5f}", f"{r['rel_rmse_llamacpp']:.5f}", f"{r['mbps_ours']:.1f}",
                  f"{r['mbps_llamacpp']:.1f}")
    con = Console(width=max(100, Console().width))
    con.print(t)
    con.print("RMSE: relative RMSE (||dequant - x|| / ||x||) on the random normal set")
    if fixture:
        con.print(f"wrote {fixture} ({(ROOT / fixture).stat().st_size / 1024:.0f} KiB)")
    con.print("OK" if ok else "FAILED: below 99.9% identical or a worse block")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
