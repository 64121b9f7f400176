"""Which rank holds what: the expert split and the layer split.

**Expert parallel** (``expert``): rank ``r`` of ``n`` holds rows ``[r*R/n, (r+1)*R/n)`` of every
expert matrix of every layer (``R`` its rows: the FFN width for gate and up, the model width for
down), so a token's experts are shared equally by all ranks, whichever experts it picks. Each rank
computes gate and up on its rows for every routed (token, expert) pair, one collective puts the
pairs' hidden activations together (each rank's columns, the others 0: summed exactly), each rank
projects them through its rows of down, and a second collective puts the outputs together. Every
number is computed as one process computes it (a row's dot product does not depend on which other
rows are computed beside it), so logits are bit-identical. Rows, not whole experts, because decode
is bandwidth-bound and a layer waits for its slowest rank: with whole experts on 2 ranks, a token's
2 of 8 experts sit on one rank 3 times in 7 and that rank reads both while the other waits.
A rank's rows are one byte range per expert matrix (a matrix is stored row by row), so its pages,
read-ahead and the expert cache's reads stay sequential.

**Whole experts** (``expert-whole``): rank ``r`` holds experts ``[r*E/n, (r+1)*E/n)`` of every
layer, each rank computes the pairs routed to its experts and one collective per layer sums them.
Half the collectives and fewer bytes on the wire (the (token, expert) outputs only), for slow
links and long prompts; unbalanced per token. Router load balancing (Mixtral's training loss)
balances it over many tokens.

In both, attention, norms, routers, the embedding and the output are on every rank; on NumPy each
rank projects its slice of the vocabulary.

**Pipeline parallel**: rank ``r`` holds layers ``[r*L/n, (r+1)*L/n)``; rank 0 also holds the
embedding, the final norm and the output, so the hidden state goes round the ring
0 -> 1 -> ... -> n-1 -> 0 (each hop between neighbours, as MLX's ring backend requires).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlxtral.config import ModelArgs
from mlxtral.errors import UsageError
from mlxtral.qtensor import Tensor

MODES = ("expert", "expert-whole", "pipeline")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)\.(\d+)\.weight$")


def _span(i: int, n: int, total: int) -> range:
    return range(i * total // n, (i + 1) * total // n)


@dataclass(frozen=True)
class Placement:
    mode: str  # one of MODES
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
        """Expert parallel (rows or whole experts) over more than one rank: a layer's expert
        outputs (and, on NumPy, the logits) are completed by a sum across the group."""
        return self.mode in ("expert", "expert-whole") and self.size > 1

    @property
    def sliced(self) -> bool:
        """Every expert split by rows over more than one rank (mode ``expert``)."""
        return self.mode == "expert" and self.size > 1

    def rows(self, n: int) -> range:
        """This rank's rows of an expert matrix of ``n`` rows (all of them unless sliced)."""
        return _span(self.rank, self.size, n) if self.sliced else range(n)

    def share(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of tensor ``name`` (one it :meth:`holds`): its rows of an expert matrix
        when sliced, as a view; any other tensor whole."""
        if not self.sliced or _EXPERT.match(name) is None:
            return t
        r = self.rows(t.shape[0])
        return t.row_range(r.start, r.stop)

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
        return self.head or self.mode != "pipeline"

    def describe(self) -> str:
        if self.mode == "expert":
            return f"rank {self.rank}/{self.size}: 1/{self.size} of the rows of every expert"
        if self.mode == "expert-whole":
            e = self.experts
            return f"rank {self.rank}/{self.size}: experts {e.start}-{e.stop - 1} of every layer"
        return f"rank {self.rank}/{self.size}: layers {self.layers.start}-{self.layers.stop - 1}"


def place(mode: str, rank: int, size: int, args: ModelArgs) -> Placement:
    """This rank's share; :class:`UsageError` when the model cannot be split that way."""
    if mode not in MODES:
        raise UsageError(f"unknown --distributed mode {mode[:40]!r}: choose expert, expert-whole or pipeline")
    if mode == "expert" or mode == "expert-whole":
        if not args.is_moe:
            raise UsageError("a dense model has no experts to split: use --distributed pipeline")
        if mode == "expert":
            if size > args.dim or size > args.hidden_dim:
                raise UsageError(f"{size} ranks for experts of {min(args.dim, args.hidden_dim)} rows: expert "
                                 "parallel needs at most one rank per row")
            return Placement(mode, rank, size, range(args.n_experts), range(args.n_layers))
        if size > args.n_experts:
            raise UsageError(f"{size} ranks for {args.n_experts} experts: --distributed expert-whole needs "
                             "at most one rank per expert")
        return Placement(mode, rank, size, _span(rank, size, args.n_experts), range(args.n_layers))
    if size > args.n_layers:
        raise UsageError(f"{size} ranks for {args.n_layers} layers: pipeline parallel needs at most one rank "
                         "per layer")
    return Placement(mode, rank, size, range(args.n_ffn), _span(rank, size, args.n_layers))
