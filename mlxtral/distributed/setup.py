"""Joining the group at load time: the same model and settings everywhere, then each rank's share."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import numpy as np

from mlxtral.distributed import doorbell
from mlxtral.distributed.group import Group, get_group
from mlxtral.distributed.placement import Placement, place
from mlxtral.formats import Checkpoint
from mlxtral.qtensor import QTensor, Tensor

_DOWN = re.compile(r"^blk\.\d+\.ffn_down\.\d+\.weight$")


def fingerprint(ckpt: Checkpoint, mode: str, settings: dict[str, Any]) -> bytes:
    """A digest of what every rank must agree on: the file's header as loaded (the configuration,
    every tensor's name, type and shape, the files' sizes) and the settings that change a number."""
    h = hashlib.sha256()
    h.update(repr(ckpt.args).encode())
    for name in sorted(ckpt.tensors):
        q = ckpt.tensors[name]
        h.update(f"{name}:{getattr(q, 'qtype', '?')}:{tuple(getattr(q, 'shape', ()))};".encode())
    try:
        h.update(f"{ckpt.format}:{ckpt.path.stat().st_size if ckpt.path.is_file() else 0};".encode())
    except OSError:
        pass
    h.update(repr((mode, sorted(settings.items()))).encode())
    return h.digest()


def join(ckpt: Checkpoint, mode: str, settings: dict[str, Any]) -> tuple[Group, Placement]:
    """Join the group (once per process), pin this host's ranks to their cores, refuse a rank whose
    model or settings differ, open the doorbell, and return this rank's share of the model."""
    place(mode, 0, 1, ckpt.args)  # an unknown mode or a model it cannot split: refused before joining
    group = get_group()
    share = place(mode, group.rank, group.size, ckpt.args)  # the same refusal on every rank
    group.check_same(fingerprint(ckpt, mode, settings), "the model file and --distributed, --backend, "
                     "--max-context, --experts-per-token")
    group.pin_cores()
    if not group.doorbell_tried:  # once per process, every rank at the same point
        group.doorbell_tried = True
        group.doorbell = doorbell.connect(group)
    return group, share


def halve(group: Group, share: Placement, tensors: dict[str, Tensor], streams: bool) -> Placement:
    """Expert parallel by rows on 2 ranks, NumPy backend: each rank takes one half of every expert's
    FFN width (gate's and up's rows, down's columns, cut where ``ops.down_split`` cuts every down
    product, in one process too), so one ``all_sum`` a layer adds down's two halves exactly as one
    process adds them: 1 collective a layer instead of 2 (activations, then outputs, gathered).
    Not when a rank streams its experts (the expert cache reads one byte range per matrix, and a
    half of down's columns is not one), nor when a down matrix cannot be cut there (an MLX-format
    file, a width under 64). Every rank votes in one collective, so all choose alike."""
    if share.mode != "expert-rows" or share.size != 2:
        return share
    ok = not streams and all(_cuttable(q) for name, q in tensors.items() if _DOWN.match(name))
    against = group.all_sum(np.array([0 if ok else 1], dtype=np.int32), "choosing how to split")
    return share if int(against[0]) else dataclasses.replace(share, halves=True)


def _cuttable(q: Tensor) -> bool:
    from mlxtral.backends.ops import down_halves

    return isinstance(q, QTensor) and q.ndim == 2 and down_halves(q) is not None


def half_tensors(share: Placement, whole: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's tensors with :attr:`Placement.halves`: views of the file, but its half of each
    down matrix's columns as a private copy read from it (:func:`read_columns`): the halves of a
    row share its pages, so a view would map the other rank's half too."""
    from mlxtral.expert_cache.reader import read_columns

    mine: dict[str, Tensor] = {}
    for name, q in whole.items():
        if not share.holds(name):
            continue
        part = share.share(name, q)
        if _DOWN.match(name) and isinstance(q, QTensor) and isinstance(part, QTensor):
            c0 = (part.data.ctypes.data - q.data.ctypes.data) // q.data.itemsize
            part = QTensor(part.qtype, part.shape, read_columns(q.data, c0, c0 + part.data.shape[1]))
        mine[name] = part
    return mine
