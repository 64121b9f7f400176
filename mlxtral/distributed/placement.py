"""Which rank holds what: the expert split and the layer split.

**Expert parallel**: rank ``r`` of ``n`` holds experts ``[r*E/n, (r+1)*E/n)`` of every layer (a
contiguous block; the sizes differ by at most one). Contiguous because a checkpoint stores a layer's
experts one after another (GGUF's ``ffn_*_exps`` tensors stack them): a rank's share is one byte
range per tensor, so its pages, read-ahead and the expert cache's reads stay sequential. Any
equal split balances the work in expectation: Mixtral's router was trained with a load-balancing
loss. Attention, norms, routers, the embedding and the output are on every rank; logits are
computed on rank 0 only.

**Pipeline parallel**: rank ``r`` holds layers ``[r*L/n, (r+1)*L/n)``; rank 0 also holds the
embedding, the final norm and the output, so the hidden state goes round the ring
0 -> 1 -> ... -> n-1 -> 0 (each hop between neighbours, as MLX's ring backend requires).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlxtral.config import ModelArgs
from mlxtral.errors import UsageError

MODES = ("expert", "pipeline")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)\.(\d+)\.weight$")


def _span(i: int, n: int, total: int) -> range:
    return range(i * total // n, (i + 1) * total // n)


@dataclass(frozen=True)
class Placement:
    mode: str  # "expert" or "pipeline"
    rank: int
    size: int
    experts: range  # the experts this rank computes, in every layer it holds
    layers: range  # the layers this rank holds

    @property
    def head(self) -> bool:
        """Embedding, final norm, output and sampling: rank 0."""
        return self.rank == 0

    @property
    def split_experts(self) -> bool:
        """Expert parallel over more than one rank: a layer's expert outputs (and, on NumPy, the
        logits) are completed by one sum across the group."""
        return self.mode == "expert" and self.size > 1

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.size

    def holds(self, name: str) -> bool:
        """Whether this rank needs tensor ``name`` (GGUF names, as every loader maps them)."""
        m = _EXPERT.match(name)
        if m is not None:
            return int(m.group(1)) in self.layers and int(m.group(2)) in self.experts
        m = _BLOCK.match(name)
        if m is not None:
            return int(m.group(1)) in self.layers
        return self.head or self.mode == "expert"

    def describe(self) -> str:
        if self.mode == "expert":
            e = self.experts
            return f"rank {self.rank}/{self.size}: experts {e.start}-{e.stop - 1} of every layer"
        return f"rank {self.rank}/{self.size}: layers {self.layers.start}-{self.layers.stop - 1}"


def place(mode: str, rank: int, size: int, args: ModelArgs) -> Placement:
    """This rank's share; :class:`UsageError` when the model cannot be split that way."""
    if mode not in MODES:
        raise UsageError(f"unknown --distributed mode {mode[:40]!r}: choose expert or pipeline")
    if mode == "expert":
        if not args.is_moe:
            raise UsageError("a dense model has no experts to split: use --distributed pipeline")
        if size > args.n_experts:
            raise UsageError(f"{size} ranks for {args.n_experts} experts: expert parallel needs at most one "
                             "rank per expert")
        return Placement(mode, rank, size, _span(rank, size, args.n_experts), range(args.n_layers))
    if size > args.n_layers:
        raise UsageError(f"{size} ranks for {args.n_layers} layers: pipeline parallel needs at most one rank "
                         "per layer")
    return Placement(mode, rank, size, range(args.n_ffn), _span(rank, size, args.n_layers))
