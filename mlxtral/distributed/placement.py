"""Which rank holds what: the expert splits and the layer split.

**Expert parallel** (``expert``): rank ``r`` of ``n`` holds experts ``[r*E/n, (r+1)*E/n)`` of every
layer (a contiguous block; the sizes differ by at most one). Contiguous because a checkpoint stores
a layer's experts one after another (GGUF's ``ffn_*_exps`` tensors stack them): a rank's share is
one byte range per tensor, so its pages, read-ahead and the expert cache's reads stay sequential.
Each rank computes the (token, expert) pairs routed to its experts and one collective per layer
sums them. A token whose experts sit on one rank waits for it (with 8 experts on 2 ranks, a token's
2 experts share a rank 3 times in 7); Mixtral's load-balancing loss evens it out over many tokens.

**By rows** (``expert-rows``): rank ``r`` holds rows ``[r*R/n, (r+1)*R/n)`` of every expert matrix
of every layer (``R`` its rows: the FFN width for gate and up, the model width for down), so every
rank reads exactly 1/n of whatever experts a token picks. Each rank computes gate and up on its rows
for every routed pair, one collective puts the pairs' hidden activations together (each rank's
columns side by side, one ``all_gather``), each rank projects them through its rows of down, and a
second collective puts the outputs together. A rank's rows are one byte range per expert matrix.
Twice the collectives and, for a prompt, ~2x the bytes on the wire (the activations cross it): for
fast links, where the balance pays (see the README's measurements).

**Halves** (``expert-rows`` on 2 ranks of the NumPy backend, chosen at load when no rank streams
its experts: :func:`mlxtral.distributed.setup.halve`): rank 0 holds the FFN columns before
``ops.down_split(hidden)`` of every expert (gate's and up's rows, down's columns), rank 1 the rest.
One process cuts every down product there too and adds the two halves in float32, so each rank
computes one half of the pairs' outputs as one process computes it, and one ``all_sum`` a layer
(``lo + hi``: two addends, the same sum in either order) completes them: the collectives of
``expert`` with the balance of ``expert-rows``. A rank's half of down is a private copy of its
columns (a row's two halves share pages).

Either way every number is computed as one process computes it (a row's dot product does not
depend on which other rows or pairs are computed beside it), so logits are bit-identical.
Attention, norms, routers, the embedding and the output are on every rank; on NumPy each rank
projects its slice of the vocabulary.

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

MODES = ("expert", "expert-rows", "pipeline")
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
    halves: bool = False  # by rows on 2 ranks: each rank one half of every expert's FFN width

    @property
    def head(self) -> bool:
        """Embedding, final norm, output and sampling: rank 0."""
        return self.rank == 0

    @property
    def split_experts(self) -> bool:
        """Expert parallel (rows or whole experts) over more than one rank: a layer's expert
        outputs (and, on NumPy, the logits) are completed by a sum across the group."""
        return self.mode in ("expert", "expert-rows") and self.size > 1

    @property
    def sliced(self) -> bool:
        """Every expert split by rows over more than one rank (mode ``expert-rows``), its
        activations and outputs gathered (not :attr:`halves`)."""
        return self.mode == "expert-rows" and self.size > 1 and not self.halves

    def rows(self, n: int) -> range:
        """This rank's rows of an expert matrix of ``n`` rows (all of them unless sliced)."""
        return _span(self.rank, self.size, n) if self.sliced else range(n)

    def half(self, hidden: int) -> range:
        """With :attr:`halves`, this rank's half of an FFN width of ``hidden``: rank 0 the columns
        before ``ops.down_split(hidden)``, rank 1 the rest."""
        from mlxtral.backends.ops import down_split

        s = down_split(hidden)
        return range(0, s) if self.rank == 0 else range(s, hidden)

    def spans(self, n: int) -> list[range]:
        """Every rank's contiguous share of ``n`` rows (or vocabulary entries), in rank order."""
        return [_span(r, self.size, n) for r in range(self.size)]

    def widths(self, n: int) -> list[int]:
        """How many of ``n`` rows each rank holds, in rank order (``[n]`` unless sliced)."""
        return [len(r) for r in self.spans(n)] if self.sliced else [n]

    def share(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of tensor ``name`` (one it :meth:`holds`), as a view: its rows of an
        expert matrix when sliced; with :attr:`halves` its half of gate's and up's rows and of
        down's columns; any other tensor whole."""
        m = _EXPERT.match(name)
        if m is None or not (self.sliced or self.halves):
            return t
        if self.halves:
            down = ".ffn_down." in name
            r = self.half(t.shape[1] if down else t.shape[0])
            if down:
                return t.col_range(r.start, r.stop)  # type: ignore[union-attr]
        else:
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
        if self.halves:
            return (f"rank {self.rank}/{self.size}: half of every expert's FFN width (down's partial "
                    "outputs summed)")
        if self.mode == "expert-rows":
            return f"rank {self.rank}/{self.size}: 1/{self.size} of the rows of every expert"
        if self.mode == "expert":
            e = self.experts
            return f"rank {self.rank}/{self.size}: experts {e.start}-{e.stop - 1} of every layer"
        return f"rank {self.rank}/{self.size}: layers {self.layers.start}-{self.layers.stop - 1}"


def place(mode: str, rank: int, size: int, args: ModelArgs) -> Placement:
    """This rank's share; :class:`UsageError` when the model cannot be split that way."""
    if mode not in MODES:
        raise UsageError(f"unknown --distributed mode {mode[:40]!r}: choose expert, expert-rows or pipeline")
    if mode == "expert" or mode == "expert-rows":
        if not args.is_moe:
            raise UsageError("a dense model has no experts to split: use --distributed pipeline")
        if mode == "expert-rows":
            if size > args.dim or size > args.hidden_dim:
                raise UsageError(f"{size} ranks for experts of {min(args.dim, args.hidden_dim)} rows: expert "
                                 "parallel needs at most one rank per row")
            return Placement(mode, rank, size, range(args.n_experts), range(args.n_layers))
        if size > args.n_experts:
            raise UsageError(f"{size} ranks for {args.n_experts} experts: expert parallel needs at most one "
                             "rank per expert")
        return Placement(mode, rank, size, _span(rank, size, args.n_experts), range(args.n_layers))
    if size > args.n_layers:
        raise UsageError(f"{size} ranks for {args.n_layers} layers: pipeline parallel needs at most one rank "
                         "per layer")
    return Placement(mode, rank, size, range(args.n_ffn), _span(rank, size, args.n_layers))
