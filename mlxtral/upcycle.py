"""Upcycle a dense llama-family GGUF into a Mixtral-shaped one with E identical experts.

Each layer's dense FFN (``blk.N.ffn_{gate,up,down}.weight``) is copied E times into the merged
expert tensors ``blk.N.ffn_{gate,up,down}_exps.weight`` (numpy ``[E, out, in]``), raw quantized
blocks copied byte for byte (no requantization), and a random float32 router
``blk.N.ffn_gate_inp.weight`` ``[E, dim]`` is added. Because the experts are identical and the
top-k routing weights sum to 1, the result computes exactly the dense model whatever the router
picks: a real-weight MoE for demos and end-to-end checks. The metadata (tokenizer, chat template,
everything else) is copied as is, plus ``{arch}.expert_count`` and ``{arch}.expert_used_count``.

The output is written with ``gguf.GGUFWriter`` tensor by tensor (streamed, so memory stays at one
layer) to a temporary file beside ``out`` that is renamed at the end; llama.cpp loads it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import show
from mlxtral.errors import FormatError, UsageError

_DENSE_FFN = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_ARCHS = ("llama", "mistral")
# Keys the writer sets itself or that upcycling changes.
_SKIP_KEYS = ("general.architecture", "general.name", "general.alignment")


def upcycle(
    src_gguf: str | os.PathLike[str],
    out_gguf: str | os.PathLike[str],
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> Path:
    """Write ``out_gguf``: ``src_gguf`` (a dense llama GGUF) with ``experts`` identical experts.

    ``progress(done, total)`` is called after each tensor is written. Returns the output path. An
    existing ``out_gguf`` is replaced only with ``force`` (and only if it is a GGUF file); the
    output is never the source (through links too), and is written atomically.
    """
    import gguf

    from mlxtral.formats.gguf_parse import parse_gguf

    src, out = Path(src_gguf), Path(out_gguf)
    if experts < 1 or experts > 256:
        raise UsageError(f"--experts must be between 1 and 256, got {experts}")
    if not 1 <= top_k <= experts:
        raise UsageError(f"--top-k must be between 1 and the number of experts ({experts}), got {top_k}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UsageError(f"--seed must be a whole number from 0 to 2^64-1, got {str(seed)[:40]}")
    if not src.exists():
        raise FormatError("no such file", src)
    if src.is_dir():
        raise FormatError("is a folder: upcycle takes a dense GGUF file", src)
    from mlxtral.convert.atomic import atomic_output
    from mlxtral.convert.gguf_writer import copy_gguf_keys
    from mlxtral.convert.output_guard import check_output, source_paths

    sources = source_paths(src)
    check_output(out, is_dir=False, force=force, sources=sources)
    f = parse_gguf(src)  # validated, memory-mapped; tensors are zero-copy views
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in _ARCHS:
        raise FormatError(f"architecture {show(arch)} cannot be upcycled "
                          f"(expected one of {', '.join(_ARCHS)})", src)
    if int(md.get(f"{arch}.expert_count") or 0):
        raise FormatError("already a mixture-of-experts model (has expert_count)", src)
    if f"{arch}.embedding_length" not in md:
        raise FormatError(f"missing {arch}.embedding_length", src)
    dim = int(md[f"{arch}.embedding_length"])

    tensors = f.tensors
    by_layer: dict[int, dict[str, Any]] = {}
    for t in tensors:
        if m := _DENSE_FFN.match(t.name):
            by_layer.setdefault(int(m[1]), {})[m[2]] = t
        elif t.name.endswith(("_exps.weight", "ffn_gate_inp.weight")):
            raise FormatError(f"already has expert tensors ({t.name})", src)
    if not by_layer:
        raise FormatError("no dense FFN tensors (blk.N.ffn_gate/up/down.weight) to upcycle", src)
    for layer, parts in sorted(by_layer.items()):
        if set(parts) != {"gate", "up", "down"}:
            raise FormatError(f"layer {layer} lacks ffn_{{gate,up,down}}.weight (has {sorted(parts)})", src)

    with atomic_output(out, is_dir=False, force=force, sources=sources) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        copy_gguf_keys(w, f, [k for k in md if k not in _SKIP_KEYS], src)
        w.add_key_value(f"{arch}.expert_count", experts, gguf.GGUFValueType.UINT32)
        w.add_key_value(f"{arch}.expert_used_count", top_k, gguf.GGUFValueType.UINT32)
        base = md.get("general.name") if isinstance(md.get("general.name"), str) else src.stem
        w.add_key_value("general.name", f"{base} (upcycled {experts}x, top-{top_k})",
                        gguf.GGUFValueType.STRING)

        rng = np.random.default_rng(seed)
        plan: list[tuple[str, Callable[[], np.ndarray]]] = []

        def add(name: str, make: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: Any,
                nbytes: int, raw: Any) -> None:
            w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
            plan.append((name, make))

        done_layers: set[int] = set()
        for t in tensors:
            m = _DENSE_FFN.match(t.name)
            if m is None:
                data = t.data
                add(t.name, lambda d=data: d, data.shape, data.dtype, data.nbytes,
                    gguf.GGMLQuantizationType[t.qtype])
                continue
            layer = int(m[1])
            if layer in done_layers:
                continue
            done_layers.add(layer)
            # Router first (as llama.cpp's converter orders them), random but seeded.
            router = rng.standard_normal((experts, dim), dtype=np.float32) / np.sqrt(dim)
            router = router.astype(np.float32)
            add(f"blk.{layer}.ffn_gate_inp.weight", lambda r=router: r, router.shape, np.float32,
                router.nbytes, None)
            for part in ("gate", "up", "down"):
                src_t = by_layer[layer][part]
                data = src_t.data  # [out, in] (or [out, bytes per row] for block types)
                raw = gguf.GGMLQuantizationType[src_t.qtype]
                shape = (experts,) + tuple(data.shape)

                def make(d: np.ndarray = data) -> np.ndarray:
                    return np.ascontiguousarray(np.broadcast_to(d, (experts,) + d.shape))

                add(f"blk.{layer}.ffn_{part}_exps.weight", make, shape, data.dtype,
                    data.nbytes * experts, raw)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (_name, make) in enumerate(plan):
            w.write_tensor_data(make())
            if progress is not None:
                progress(i + 1, len(plan))
        w.close()
    return out
