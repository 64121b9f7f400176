#!/usr/bin/env python3
"""Our K-quant mixes (``mlxtral convert --q4_k_m`` ...) against llama.cpp's ``llama-quantize``.

    python benchmarks/kquant_vs_llamacpp.py                       # every mix, two shapes
    python benchmarks/kquant_vs_llamacpp.py --mixes q4_k_m,q2_k --shapes bench --json

For each shape, an F32 bench model is built once (``shared/bench/make_moe_gguf.py --type f32``,
into ``--cache-dir``): ``bench`` is the default bench shape (dim 1024, ffn 3584, 8 experts) with
``--layers`` layers (default 4, for speed); ``odd`` has ffn 1120 (``ffn_down``'s rows are not a
multiple of 256: llama.cpp's fallback types Q4_0/Q5_0/Q5_1/Q8_0 there). Each mix is then written
twice from the same F32 file: by llama.cpp (``llama_model_quantize`` of llama-cpp-python's
libllama, called with ctypes in ``~/llamacpp/bin/python`` or ``MLXTRAL_LLAMACPP_PYTHON``,
2 threads) and by ``mlxtral.convert.convert``. Per tensor: the type each chose (must be equal),
the share of blocks that are byte-identical, and, where blocks differ, both files' relative RMSE
against the F32 source (dequantized with gguf.quants); per file: ``general.file_type``, size, time.
``--types-only`` compares the type choices alone (llama.cpp's dry run against our plan).

Prints rich tables; ``--json`` prints one JSON object instead. Exit status 1 if a type differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
MAKER = HERE.parents[2] / "shared" / "bench" / "make_moe_gguf.py"
LLAMA_PY = Path(os.environ.get("MLXTRAL_LLAMACPP_PYTHON") or Path.home() / "llamacpp" / "bin" / "python")
MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# also accepted by --mixes: llama.cpp's Q4_0/Q4_1/Q8_0 file types, whose upgrades (output Q6_K, 8 experts:
# attn_k/attn_v Q8_0) our --q4/--q4_1/--q8 follow too
LEGACY = ("q4_0", "q4_1", "q8_0")
SHAPES = {
    "bench": [],
    "odd": ["--ffn", "1120"],
    # small shapes for --types-only (the layer-dependent and non-8-expert rules; a trailing --layers
    # overrides the global one)
    "e8-L32": ["--dim", "256", "--ffn", "256", "--layers", "32"],
    "e4-L16": ["--dim", "256", "--ffn", "512", "--experts", "4", "--layers", "16"],
    "e4-gqa2-L16": ["--dim", "256", "--ffn", "480", "--experts", "4", "--kv-heads", "4", "--layers", "16"],
}

# Runs in llama-cpp-python's interpreter: llama_model_quantize through ctypes with the
# llama_model_quantize_params layout of llama.h (llama-cpp-python 0.3.36's vendored llama.cpp).
LLAMA_WORKER = r"""
import ctypes, json, sys, time
from pathlib import Path
import llama_cpp
lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libllama.so"))
class Params(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
                ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
                ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool),
                ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p),
                ("prune_layers", ctypes.c_void_p), ("max_buf_size", ctypes.c_size_t)]
lib.llama_model_quantize_default_params.restype = Params
lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(Params)]
lib.llama_model_quantize.restype = ctypes.c_uint32
lib.llama_backend_init()
src, out, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = lib.llama_model_quantize_default_params()
p.ftype, p.nthread = ftype, threads
p.dry_run = len(sys.argv) > 5 and sys.argv[5] == "dry"
t0 = time.perf_counter()
rc = lib.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p))
print(json.dumps({"rc": int(rc), "seconds": time.perf_counter() - t0}))
"""


def build_model(cache: Path, shape: str, layers: int) -> Path:
    path = cache / f"kq-{shape}-L{layers}.f32.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        cmd = [sys.executable, str(MAKER), str(tmp), "--type", "f32", "--layers", str(layers), *SHAPES[shape]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tmp.rename(path)
    return path


def _llama_run(src: Path, out: Path, mix: str, threads: int, dry: bool = False) -> tuple[float, str]:
    import gguf

    ftype = int(gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"])
    argv = [str(LLAMA_PY), "-c", LLAMA_WORKER, str(src), str(out), str(ftype), str(threads)]
    r = subprocess.run(argv + (["dry"] if dry else []), capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"llama_model_quantize failed ({r.returncode}): {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"llama_model_quantize returned {res['rc']}: {r.stderr[-2000:]}")
    return float(res["seconds"]), r.stderr


def llama_quantize(src: Path, out: Path, mix: str, threads: int) -> float:
    return _llama_run(src, out, mix, threads)[0]


def llama_dry_types(src: Path, mix: str) -> dict[str, str]:
    """llama-quantize's choice per tensor without quantizing (``dry_run``), from its log lines
    ``[  i/  n] name - [shape], type = f32, size = a MiB -> b MiB (q4_K)``."""
    import re

    _, log = _llama_run(src, src.with_suffix(".dry"), mix, 1, dry=True)
    pat = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\S+), size = .*?(?:\((\S+)\))?\s*$")
    out = {}
    for line in log.splitlines():
        m = pat.match(line.strip())
        if m:
            out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return out


def our_plan_types(src: Path, mix: str) -> dict[str, str]:
    from mlxtral.convert.gguf_writer import plan_gguf
    from mlxtral.formats.detect import open_checkpoint

    return {t.name: t.qtype for t in plan_gguf(open_checkpoint(src), mix.upper())}


def types_only(shapes: list[str], mixes: list[str], cache: Path, layers: int, as_json: bool) -> int:
    """Compare only the per-tensor type choice (llama.cpp's dry run vs our plan): no quantizer needed."""
    rows = []
    for shape in shapes:
        src = build_model(cache, shape, layers)
        for mix in mixes:
            theirs, ours = llama_dry_types(src, mix), our_plan_types(src, mix)
            diff = sorted((n, ours.get(n), theirs.get(n)) for n in set(ours) | set(theirs)
                          if ours.get(n) != theirs.get(n))
            rows.append({"shape": shape, "mix": mix.upper(), "tensors": len(theirs), "mismatches": diff,
                         "types": sorted(set(ours.values()))})
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="per-tensor types: llama.cpp dry run vs mlxtral's plan")
        for col in ("shape", "mix", "tensors", "equal", "types used"):
            t.add_column(col)
        for r in rows:
            ok = not r["mismatches"]
            t.add_row(r["shape"], r["mix"], str(r["tensors"]),
                      "[green]yes" if ok else f"[red]{len(r['mismatches'])} differ", " ".join(r["types"]))
        Console(width=None if sys.stdout.isatty() else 150).print(t)
        for r in rows:
            for n, a, b in r["mismatches"]:
                print(f"{r['shape']} {r['mix']}: {n}: ours {a}, llama.cpp {b}")
    return 0 if all(not r["mismatches"] for r in rows) else 1


def ours_quantize(src: Path, out: Path, mix: str, threads: int) -> float:
    """``mlxtral convert`` in a subprocess (its own threads and memory, like llama.cpp's run)."""
    env = dict(os.environ, MLXTRAL_CONVERT_THREADS=str(threads))
    code = ("import sys, time; from mlxtral.convert import convert; t0 = time.perf_counter(); "
            "convert(sys.argv[1], sys.argv[2], qtype=sys.argv[3], progress=False, force=True); "
            "print(time.perf_counter() - t0)")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out), mix], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"mlxtral convert failed: {r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def file_type(reader: Any) -> int:
    f = reader.fields["general.file_type"]
    return int(f.parts[f.data[0]][0])


def rel_rmse(ref: np.ndarray, got: np.ndarray) -> float:
    num = float(np.square(got.astype(np.float64) - ref).sum())
    den = float(np.square(ref.astype(np.float64)).sum())
    return float(np.sqrt(num / den)) if den else 0.0


def compare(src: Path, ours: Path, theirs: Path) -> dict[str, Any]:
    """Per tensor: types, identical blocks, errors where blocks differ; per file: type, sizes."""
    import gguf

    rs, ro, rt = gguf.GGUFReader(src), gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ref = {t.name: t for t in rs.tensors}
    mine = {t.name: t for t in ro.tensors}
    tensors = []
    for t in rt.tensors:
        o = mine.get(t.name)
        row: dict[str, Any] = {"name": t.name, "llama_type": t.tensor_type.name,
                               "our_type": o.tensor_type.name if o is not None else None}
        if o is None or o.tensor_type != t.tensor_type:
            row.update(identical=0.0, blocks=0)
            tensors.append(row)
            continue
        _, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        a = np.asarray(o.data).view(np.uint8).reshape(-1, ts)
        b = np.asarray(t.data).view(np.uint8).reshape(-1, ts)
        same = (a == b).all(axis=1)
        row.update(blocks=int(same.size), identical=float(same.mean()), differing=int((~same).sum()))
        if not same.all():
            x = np.asarray(ref[t.name].data, dtype=np.float32).reshape(-1)
            ya = gguf.quants.dequantize(np.asarray(o.data), o.tensor_type).reshape(-1)
            yb = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
            row.update(our_rmse=rel_rmse(x, ya), llama_rmse=rel_rmse(x, yb))
        tensors.append(row)
    extra = sorted(set(mine) - {t.name for t in rt.tensors})
    data_o = sum(int(t.n_bytes) for t in ro.tensors)
    data_t = sum(int(t.n_bytes) for t in rt.tensors)
    return {"tensors": tensors, "only_ours": extra,
            "file_type": {"ours": file_type(ro), "llama": file_type(rt)},
            "size": {"ours": ours.stat().st_size, "llama": theirs.stat().st_size},
            "tensor_bytes": {"ours": data_o, "llama": data_t}}


def summarize(mix: str, shape: str, cmp: dict[str, Any], t_ours: float, t_llama: float, src_bytes: int
              ) -> dict[str, Any]:
    ts = cmp["tensors"]
    types_equal = sum(r["our_type"] == r["llama_type"] for r in ts)
    blocks = sum(r["blocks"] for r in ts)
    same = sum(r["blocks"] * r["identical"] for r in ts)
    worse = [r for r in ts if "our_rmse" in r and r["our_rmse"] > r["llama_rmse"] * (1 + 1e-6)]
    return {"shape": shape, "mix": mix.upper(), "tensors": len(ts), "types_equal": types_equal,
            "type_mismatches": [(r["name"], r["our_type"], r["llama_type"]) for r in ts
                                if r["our_type"] != r["llama_type"]]
            + [(n, "extra", None) for n in cmp["only_ours"]],
            "blocks_identical_pct": 100.0 * same / blocks if blocks else 100.0,
            "worst_tensor_pct": min((100.0 * r["identical"] for r in ts), default=100.0),
            "tensors_all_identical": sum(r["identical"] == 1.0 for r in ts),
            "tensors_higher_error": [(r["name"], r["our_rmse"], r["llama_rmse"]) for r in worse],
            "file_type": cmp["file_type"], "size": cmp["size"], "tensor_bytes": cmp["tensor_bytes"],
            "seconds": {"ours": t_ours, "llama": t_llama},
            "ours_mb_s": src_bytes / 1e6 / t_ours if t_ours else 0.0}


def print_tables(results: list[dict[str, Any]], details: dict[str, list[dict[str, Any]]],
                 verbose: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 170)  # piped: wide enough for the table
    tab = Table(title="K-quant mixes: mlxtral vs llama.cpp (same F32 source)")
    for col in ("shape", "mix", "types =", "blocks identical", "worst tensor", "all-identical tensors",
                "higher error", "file_type o/l", "size ours", "size llama", "time ours", "time llama"):
        tab.add_column(col, justify="left" if col in ("shape", "mix") else "right")
    for r in results:
        ok = r["types_equal"] == r["tensors"] and not r["type_mismatches"]
        tab.add_row(r["shape"], r["mix"], f"[{'green' if ok else 'red'}]{r['types_equal']}/{r['tensors']}",
                    f"{r['blocks_identical_pct']:.4f}%", f"{r['worst_tensor_pct']:.3f}%",
                    f"{r['tensors_all_identical']}/{r['tensors']}", str(len(r["tensors_higher_error"])),
                    f"{r['file_type']['ours']}/{r['file_type']['llama']}",
                    f"{r['size']['ours'] / 1e6:,.2f} MB", f"{r['size']['llama'] / 1e6:,.2f} MB",
                    f"{r['seconds']['ours']:.1f} s", f"{r['seconds']['llama']:.1f} s")
    con.print(tab)
    for r in results:
        for name, ours, theirs in r["type_mismatches"]:
            con.print(f"[red]{r['shape']} {r['mix']}: {name}: ours {ours}, llama.cpp {theirs}")
        for name, a, b in r["tensors_higher_error"]:
            con.print(f"[yellow]{r['shape']} {r['mix']}: {name}: rel. RMSE ours {a:.6g} > llama.cpp {b:.6g}")
    if verbose:
        for key, rows in details.items():
            t = Table(title=key)
            for col in ("tensor", "type", "identical", "rmse ours", "rmse llama"):
                t.add_column(col)
            for row in rows:
                t.add_row(row["name"], f"{row['our_type']}" + ("" if row["our_type"] == row["llama_type"]
                                                              else f" (llama {row['llama_type']})"),
                          f"{100 * row['identical']:.3f}%", f"{row.get('our_rmse', float('nan')):.5g}",
                          f"{row.get('llama_rmse', float('nan')):.5g}")
            con.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixes", default=",".join(MIXES), help="K mixes, or also " + ", ".join(LEGACY))
    ap.add_argument("--shapes", default="bench,odd")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default="/tmp/mlxtral-bench")
    ap.add_argument("--keep", action="store_true", help="keep the quantized files")
    ap.add_argument("--verbose", action="store_true", help="a table per mix with every tensor")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--types-only", action="store_true",
                    help="compare the type choices only (llama.cpp dry run vs our plan; no quantizing)")
    a = ap.parse_args()
    if not LLAMA_PY.exists():
        sys.stderr.write(f"error: no llama-cpp-python interpreter at {LLAMA_PY} "
                         "(set MLXTRAL_LLAMACPP_PYTHON)\n")
        return 2
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if a.types_only:
        return types_only(a.shapes.split(","), a.mixes.split(","), cache, a.layers, a.json)
    results, details = [], {}
    for shape in a.shapes.split(","):
        src = build_model(cache, shape, a.layers)
        for mix in a.mixes.split(","):
            ours, theirs = cache / f"kq-{shape}.{mix}.ours.gguf", cache / f"kq-{shape}.{mix}.llama.gguf"
            t_llama = llama_quantize(src, theirs, mix, a.threads)
            t_ours = ours_quantize(src, ours, mix, a.threads)
            cmp = compare(src, ours, theirs)
            results.append(summarize(mix, shape, cmp, t_ours, t_llama, src.stat().st_size))
            details[f"{shape} {mix.upper()}"] = cmp["tensors"]
            if not a.json:
                r = results[-1]
                sys.stderr.write(f"{shape} {mix}: types {r['types_equal']}/{r['tensors']}, blocks identical "
                                 f"{r['blocks_identical_pct']:.4f}%, {t_ours:.1f} s vs {t_llama:.1f} s\n")
            if not a.keep:
                ours.unlink()
                theirs.unlink()
    if a.json:
        print(json.dumps({"results": results, "tensors": details if a.verbose else None}, indent=1))
    else:
        print_tables(results, details, a.verbose)
    return 0 if all(r["types_equal"] == r["tensors"] and not r["type_mismatches"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
