"""Where each expert lies in the checkpoint file: byte ranges, types and shapes.

The loaders hand out every expert matrix as a zero-copy view of the file's memory map
(:class:`numpy.memmap`), in both GGUF layouts: merged ``ffn_*_exps`` tensors split per expert
(each expert's gate, up and down matrices are then each one contiguous range) and the legacy
per-expert tensors. The view's address minus the map's gives the file offset, so the layout is
read off the tensors the loader already validated, not guessed from names or parsed twice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import FormatError
from mlxtral.qtensor import QTensor, Tensor
from mlxtral.wording import plural

KINDS = ("gate", "up", "down")  # w1, w3, w2: the order of an expert's matrices everywhere here
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


def is_expert(name: str) -> bool:
    return _EXPERT.match(name) is not None


@dataclass(frozen=True)
class Span:
    """One expert matrix in the file: ``nbytes`` at ``offset``, a ``qtype`` tensor of ``shape``
    whose raw data has ``data_shape`` (uint8 blocks, or the float dtype's shape)."""

    offset: int
    nbytes: int
    qtype: str
    shape: tuple[int, ...]
    data_shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ExpertLayout:
    """Every expert of a MoE checkpoint: ``spans[layer][expert]`` = (gate, up, down)."""

    path: Path
    n_layers: int
    n_experts: int
    spans: tuple[tuple[tuple[Span, Span, Span], ...], ...]

    def expert_bytes(self, layer: int, expert: int) -> int:
        return sum(s.nbytes for s in self.spans[layer][expert])

    @property
    def max_expert_bytes(self) -> int:
        return max(self.expert_bytes(li, e) for li in range(self.n_layers) for e in range(self.n_experts))

    @property
    def total_bytes(self) -> int:
        return sum(self.expert_bytes(li, e) for li in range(self.n_layers) for e in range(self.n_experts))


def _memmap_of(a: np.ndarray) -> np.memmap | None:
    """The :class:`numpy.memmap` that ``a`` is a view of, or None."""
    b: object = a
    found = None
    for _ in range(64):
        if isinstance(b, np.memmap) and getattr(b, "filename", None):
            found = b  # keep walking: the outermost memmap is the whole-file map
        nxt = getattr(b, "base", None)
        if not isinstance(nxt, np.ndarray):
            break
        b = nxt
    return found


def file_range(a: np.ndarray) -> tuple[Path, int] | None:
    """(file, byte offset) of ``a``, a contiguous view of a memory-mapped file; else None."""
    mm = _memmap_of(a)
    if mm is None or not a.flags.c_contiguous:
        return None
    off = a.__array_interface__["data"][0] - mm.__array_interface__["data"][0] + int(mm.offset)
    return Path(mm.filename), int(off)


def _span(q: Tensor, name: str, path: Path) -> tuple[Span, Path]:
    if not isinstance(q, QTensor):
        raise FormatError(f"tensor {name}: streaming experts needs them as a GGUF stores them (this "
                          f"checkpoint holds {q.qtype}); convert it: mlxtral convert SRC OUT.gguf", path)
    where = file_range(q.data)
    if where is None:
        raise FormatError(f"tensor {name} is not a contiguous range of a memory-mapped file: streaming "
                          "experts needs a GGUF file (mlxtral convert SRC OUT.gguf)", path)
    file, start = where
    span = Span(start, int(q.data.nbytes), q.qtype, tuple(q.shape), tuple(q.data.shape), q.data.dtype.str)
    return span, file


def expert_layout(args: ModelArgs, tensors: dict[str, Tensor], path: Path) -> ExpertLayout:
    """The layout of ``tensors``' experts (a MoE checkpoint whose experts are file views)."""
    if not args.is_moe:
        raise FormatError("streaming experts needs a mixture-of-experts model (this one is dense)", path)
    files: set[Path] = set()
    layers = []
    for li in range(args.n_layers):
        experts = []
        for e in range(args.n_experts):
            trio = []
            for kind in KINDS:
                name = f"blk.{li}.ffn_{kind}.{e}.weight"
                span, f = _span(tensors[name], name, path)
                files.add(f)
                trio.append(span)
            experts.append(tuple(trio))
        layers.append(tuple(experts))
    if len(files) != 1:
        raise FormatError(f"experts are spread over {plural(len(files), 'file')}; streaming needs one GGUF "
                          "file", path)
    return ExpertLayout(files.pop(), args.n_layers, args.n_experts, tuple(layers))  # type: ignore[arg-type]
