"""Speed and peak memory of ``mlxtral convert`` on a model of several GB.

    python benchmarks/bench_convert.py                       # 3.16 GB f32 GGUF -> Q4_0 GGUF, MLX 4-bit
    python benchmarks/bench_convert.py --hf                  # also a ~3.2 GB bf16 HF folder as source
    python benchmarks/bench_convert.py --targets q4.gguf,q8.gguf,q4.mlx --json out.json

Sources are built once into ``--dir`` (default /tmp/mlxtral-convert-bench) and reused:

- ``moe-f32.gguf``: ``../shared/bench/make_moe_gguf.py --type f32`` (dim 1024, 8 layers, 8 experts,
  ffn 3584, vocab 32000: 0.79B params, 3.16 GB);
- ``hf-bf16/``: the same shape with 16 layers as an HF folder, bf16 safetensors sharded per layer
  (1.6B params, ~3.2 GB), written layer by layer with the tests' safetensors helper.

Each conversion runs ``mlxtral convert SRC OUT --<type>`` in a subprocess (the command a user runs,
progress bar and summary included); its wall time, input MB/s and peak RSS (``os.wait4``'s
``ru_maxrss`` of that very process) are reported. The page cache is not dropped between runs
(no root needed); the first run after building a source reads it from the cache as the rest do.

Measured on the 2-core dev machine (load average 2-4 from other jobs), numbers from this commit's runs:

    source              output        threads  time s  MB/s  peak RSS
    moe-f32.gguf 3.17GB Q4_0 GGUF     1        17.9    177   531 MB
    moe-f32.gguf 3.17GB Q4_0 GGUF     2        12.0    263   319 MB
    moe-f32.gguf 3.17GB MLX 4-bit     1        14.7    216   360 MB
    moe-f32.gguf 3.17GB MLX 4-bit     2        16.6    190   287 MB
    hf-bf16      3.03GB Q4_0 GGUF     2        30.4    100   356 MB
    hf-bf16      3.03GB MLX 4-bit     2        27.9    109   563 MB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
PY = sys.executable


def mlxtral_cmd() -> list[str]:
    return [PY, "-m", "mlxtral.cli"]


def build_gguf(path: Path) -> None:
    if path.exists():
        return
    print(f"building {path} (make_moe_gguf.py --type f32) ...", flush=True)
    tmp = path.with_suffix(".tmp")
    subprocess.run([PY, str(SHARED_BENCH / "make_moe_gguf.py"), str(tmp), "--type", "f32"], check=True)
    tmp.rename(path)


def build_hf(folder: Path, layers: int = 16, dim: int = 1024, ffn: int = 3584, experts: int = 8,
             heads: int = 8, kv_heads: int = 2, vocab: int = 32000) -> None:
    """A random bf16 HF Mixtral folder, one safetensors shard per layer (bounded memory)."""
    if (folder / "config.json").exists():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import shutil

    from tiny_models import BF16, hf_config, tiny_args, tokenizer_path, write_safetensors

    from mlxtral.qtensor import f32_to_bf16

    print(f"building {folder} ({layers} layers, bf16) ...", flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = tiny_args(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=dim // heads,
                     hidden_dim=ffn, vocab_size=vocab, n_experts=experts)
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int) -> BF16:
        return BF16(f32_to_bf16(rng.standard_normal((rows, cols), dtype=np.float32) * (0.5 / np.sqrt(cols))))

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    shards: list[dict[str, object]] = [{"model.embed_tokens.weight": mat(vocab, dim),
                                        "model.norm.weight": norm(), "lm_head.weight": mat(vocab, dim)}]
    wm: dict[str, str] = {}
    n = layers + 1

    def flush(j: int, tensors: dict[str, object]) -> None:
        fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(tmp / fname, tensors, {"format": "pt"})  # type: ignore[arg-type]
        wm.update({k: fname for k in tensors})

    flush(0, shards[0])
    hd = dim // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        t: dict[str, object] = {p + "input_layernorm.weight": norm(),
                                p + "post_attention_layernorm.weight": norm(),
                                p + "self_attn.q_proj.weight": mat(heads * hd, dim),
                                p + "self_attn.k_proj.weight": mat(kv_heads * hd, dim),
                                p + "self_attn.v_proj.weight": mat(kv_heads * hd, dim),
                                p + "self_attn.o_proj.weight": mat(dim, heads * hd),
                                p + "block_sparse_moe.gate.weight": mat(experts, dim)}
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = mat(ffn, dim)
            t[q + "w3.weight"] = mat(ffn, dim)
            t[q + "w2.weight"] = mat(dim, ffn)
        flush(i + 1, t)
        del t
    cfg = hf_config(args)
    cfg["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    shutil.copy(tokenizer_path(), tmp / "tokenizer.model")
    tmp.rename(folder)


def size_of(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def run_convert(src: Path, out: Path, prec: str, fmt: str, extra_env: dict[str, str] | None = None
                ) -> dict[str, object]:
    cmd = [*mlxtral_cmd(), "convert", str(src), str(out), f"--{prec}", "--format", fmt, "--force"]
    env = dict(os.environ, **(extra_env or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode(errors='replace')[-3000:]}")
    bytes_in = size_of(src)
    return {"src": src.name, "out": f"{prec} {fmt}", "bytes_in": bytes_in, "bytes_out": size_of(out),
            "seconds": round(wall, 2), "mb_per_s": round(bytes_in / wall / 1e6, 1),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "user_s": round(ru.ru_utime, 1),
            "sys_s": round(ru.ru_stime, 1), **({"env": extra_env} if extra_env else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mlxtral-convert-bench"))
    ap.add_argument("--targets", default="q4.gguf,q4.mlx",
                    help="comma list of PREC.FMT (prec q4, q4_1, q8, f16, bf16, f32; fmt gguf or mlx)")
    ap.add_argument("--hf", action="store_true", help="also convert from a ~3.2 GB bf16 HF folder")
    ap.add_argument("--no-gguf-src", action="store_true", help="skip the f32 GGUF source")
    ap.add_argument("--threads", default="", help="comma list of MLXTRAL_CONVERT_THREADS values to compare")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", nargs="?", const="-", help="write the results as JSON (to a file or stdout)")
    a = ap.parse_args()

    a.dir.mkdir(parents=True, exist_ok=True)
    sources = []
    if not a.no_gguf_src:
        build_gguf(a.dir / "moe-f32.gguf")
        sources.append(a.dir / "moe-f32.gguf")
    if a.hf:
        build_hf(a.dir / "hf-bf16")
        sources.append(a.dir / "hf-bf16")
    threads = [t for t in a.threads.split(",") if t] or [None]
    rows = []
    for src in sources:
        for target in a.targets.split(","):
            prec, fmt = target.rsplit(".", 1)
            for th in threads:
                out = a.dir / f"out-{src.stem}-{prec}{'.gguf' if fmt == 'gguf' else '-mlx'}"
                env = {"MLXTRAL_CONVERT_THREADS": th} if th else None
                r = run_convert(src, out, prec, fmt, env)
                rows.append(r)
                print(f"  {r['src']} -> {r['out']}{' threads=' + th if th else ''}: {r['seconds']} s, "
                      f"{r['mb_per_s']} MB/s, peak RSS {r['peak_rss_mb']} MB", flush=True)
                if not a.keep:
                    import shutil

                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)

    print()
    head = f"{'source':<14} {'output':<10} {'thr':>3} {'in GB':>6} {'out GB':>6} {'time s':>7} " \
           f"{'MB/s':>6} {'peak RSS MB':>11} {'user s':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        th = (r.get("env") or {}).get("MLXTRAL_CONVERT_THREADS", "-")  # type: ignore[union-attr]
        print(f"{r['src']:<14} {r['out']:<10} {th:>3} {r['bytes_in'] / 1e9:6.2f} {r['bytes_out'] / 1e9:6.2f} "
              f"{r['seconds']:7.1f} {r['mb_per_s']:6.0f} {r['peak_rss_mb']:11.0f} {r['user_s']:6.0f}")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} (2 cores; others' jobs inflate the times, not the RSS)")
    if a.json:
        doc = json.dumps({"results": rows, "loadavg": load, "cpus": os.cpu_count()}, indent=1)
        if a.json == "-":
            print(doc)
        else:
            Path(a.json).write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
