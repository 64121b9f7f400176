"""Open any checkpoint: detect its format by content, load it, check it against its config.

- a file starting with ``b"GGUF"`` -> :func:`mlxtral.formats.gguf.load_gguf`
- a folder with ``params.json`` and ``consolidated.*`` weights -> Mistral original
- a folder whose ``config.json`` has ``quantization`` (mlx-lm) or whose tensors use mlx-lm's
  ``switch_mlp`` names -> MLX folder
- a folder with ``config.json`` -> Hugging Face

Every loader ends with :func:`validate_tensors`: every tensor the config implies is there with
the right shape, and nothing else is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.display import plain
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint, expected_shapes
from mlxtral.formats.files import open_regular, read_side_json
from mlxtral.wording import plural

_SHOW = 5


def _are(items: list[str]) -> str:
    return "is" if len(items) == 1 else "are"


def _few(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(plain(n) for n in names[:_SHOW]) + more


def validate_shapes(shapes: dict[str, tuple[int, ...]], args: ModelArgs, path: Path | str | None) -> None:
    """Raise :class:`FormatError` unless ``shapes`` (internal names) is exactly what ``args`` implies.

    Loaders call it on names and shapes alone, before converting or copying any tensor."""
    per_layer = 7 + int(args.is_moe) + 3 * args.n_ffn
    n_want = 2 + int(not args.tie_word_embeddings) + args.n_layers * per_layer
    if n_want > 4 * len(shapes) + 1000:  # a lying config: refuse before listing millions of names
        raise FormatError(f"the config implies {plural(n_want, 'tensor')} ({plural(args.n_layers, 'layer')} "
                          f"x {per_layer}) but the checkpoint holds {len(shapes)}", path)
    want = expected_shapes(args)
    missing = [n for n in want if n not in shapes]
    unused = sorted(n for n in shapes if n not in want)
    wrong = [f"{n} {tuple(shapes[n])} (config implies {want[n]})"
             for n in want if n in shapes and tuple(shapes[n]) != want[n]]
    problems = []
    if missing:
        problems.append(f"{plural(len(missing), 'tensor')} the config needs {_are(missing)} missing: "
                        f"{_few(missing)}")
    if wrong:
        problems.append(f"{plural(len(wrong), 'tensor')} {'disagrees' if len(wrong) == 1 else 'disagree'} "
                        f"with the config: {_few(wrong)}")
    if unused:
        problems.append(f"{plural(len(unused), 'tensor')} {_are(unused)} not used by the model: "
                        f"{_few(unused)}")
    if problems:
        raise FormatError("; ".join(problems), path)


def validate_tensors(ckpt: Checkpoint) -> None:
    """Raise :class:`FormatError` unless ``ckpt.tensors`` is exactly what ``ckpt.args`` implies
    (names and shapes), with norms and routers in float32 and finite."""
    validate_shapes({n: tuple(q.shape) for n, q in ckpt.tensors.items()}, ckpt.args, ckpt.path)
    for name, q in ckpt.tensors.items():
        if name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            if q.qtype != "F32":
                raise FormatError(f"tensor {plain(name)} must be float32 after loading, got {q.qtype}",
                                  ckpt.path)
            # small tensors (a few MB for Mixtral), so checked here; the big ones only show as NaN logits
            if not np.isfinite(q.data).all():
                raise FormatError(f"tensor {plain(name)} holds NaN or infinite values (a corrupt file?)",
                                  ckpt.path)


def detect_format(path: str | Path) -> str:
    """``"gguf"``, ``"original"``, ``"mlx"`` or ``"hf"``; :class:`FormatError` otherwise."""
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    if not p.is_file() and not p.is_dir():
        raise FormatError("not a regular file (a pipe, device or socket cannot be a checkpoint)", p)
    if p.is_file():
        try:
            with open_regular(p) as f:  # a file swapped for a FIFO after the check is refused too
                head = f.read(8)
        except OSError as e:
            raise FormatError(f"cannot read ({e.strerror})", p) from None
        if head[:4] == b"GGUF":
            return "gguf"
        hint = ""
        if head[:4] == b"PK\x03\x04" or p.suffix in (".safetensors", ".pth", ".bin"):
            hint = "; for safetensors or .pth weights pass the folder that holds them with their config"
        raise FormatError(f"not a GGUF file (starts with {head[:4]!r}){hint}", p)
    if (p / "params.json").exists() and _original_weights(p):  # exists: a FIFO is refused by name
        return "original"
    cfg_path = p / "config.json"
    if cfg_path.exists():
        cfg = read_side_json(cfg_path)  # regular file, size cap, one-line FormatError
        if isinstance(cfg, dict) and "quantization" in cfg:
            return "mlx"
        if _has_switch_mlp(p):
            return "mlx"
        return "hf"
    if (p / "params.json").exists():
        raise FormatError("params.json found but no consolidated.*.pth or consolidated.safetensors "
                          "weights", p)
    raise FormatError("not a checkpoint folder (no config.json or params.json): expected a GGUF file, or an "
                      "HF, Mistral original or MLX folder", p)


def _original_weights(folder: Path) -> bool:
    return any(folder.glob("consolidated*.pth")) or any(folder.glob("consolidated*.safetensors"))


def _has_switch_mlp(folder: Path) -> bool:
    from mlxtral.formats.safetensors import tensor_names

    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wm = read_side_json(idx).get("weight_map", {})
            return any(".switch_mlp." in k for k in wm)
        except (FormatError, AttributeError, TypeError):
            return False  # the HF loader reports the broken index
    for f in sorted(folder.glob("model*.safetensors"))[:1]:
        try:
            return any(".switch_mlp." in k for k in tensor_names(f))
        except FormatError:
            return False
    return False


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Load any supported checkpoint into the internal layout (see :mod:`mlxtral.formats`)."""
    kind = detect_format(path)
    if kind == "gguf":
        from mlxtral.formats.gguf import load_gguf

        return load_gguf(path)
    if kind == "original":
        from mlxtral.formats.original import load_original

        return load_original(path)
    if kind == "mlx":
        from mlxtral.formats.mlx_folder import load_mlx_folder

        return load_mlx_folder(path)
    from mlxtral.formats.hf import load_hf

    return load_hf(path)
