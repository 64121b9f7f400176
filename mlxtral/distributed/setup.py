"""Joining the group at load time: the same model and settings everywhere, then each rank's share."""
from __future__ import annotations

import hashlib
from typing import Any

from mlxtral.distributed import doorbell
from mlxtral.distributed.group import Group, get_group
from mlxtral.distributed.placement import Placement, place
from mlxtral.formats import Checkpoint


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
