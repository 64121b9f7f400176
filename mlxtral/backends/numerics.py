"""The one numerics guard of the forward pass: logits must be finite before anything samples them.

A checkpoint whose weights hold NaN or Inf (a corrupt download, a broken conversion) makes every
later number NaN; samplers then fail far from the cause (NumPy's ``probabilities contain NaN``,
MLX drawing garbage). Both backends check the logits they return (a pass over ``vocab`` floats,
microseconds) and raise :class:`~mlxtral.errors.NumericalError`, one line; scanning every weight
at load would read the whole file, so only the small tensors (norms, routers) are checked there
(:func:`mlxtral.formats.detect.validate_tensors`).
"""
from __future__ import annotations

import numpy as np

from mlxtral.errors import NumericalError


def non_finite_error(position: int) -> NumericalError:
    """The error for non-finite logits at ``position`` (1-based, in the context)."""
    return NumericalError(f"the model produced non-finite logits at token {position}; its weights may hold "
                          "NaN/Inf (try `mlxtral convert --verify` or `mlxtral info`)")


def check_logits(logits: np.ndarray, first_position: int) -> None:
    """Raise :class:`NumericalError` unless ``logits`` ([T, vocab] or [vocab], rows for positions
    ``first_position``, ``first_position + 1``... counted from 1) are all finite."""
    if np.isfinite(logits).all():
        return
    rows = logits.reshape(-1, logits.shape[-1])  # [T, vocab]
    bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
    raise non_finite_error(first_position + bad)
