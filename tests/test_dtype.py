"""The MLX compute dtype through ``mlxtral.load(dtype=...)``: float32 (CPU default), float16 and
bfloat16 run and stay close to float32; the NumPy backend refuses a dtype it does not compute in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, tiny_args, write_gguf

import mlxtral
from mlxtral.errors import UsageError

mx = pytest.importorskip("mlx.core")
IDS = [1, 415, 2936, 9060, 285, 1142]


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args(n_experts=0)  # dense: MLX's CPU gather ops are float32-only
    return write_gguf(tmp_path_factory.mktemp("dt") / "m.gguf", random_weights(args, seed=4), args)


@pytest.mark.parametrize("dtype,tol", [("float16", 0.05), ("bfloat16", 0.3)])
def test_mlx_dtypes_run_close_to_float32(path: Path, dtype: str, tol: float) -> None:
    ref = mlxtral.load(path, backend="mlx", tokenizer=False).logits(IDS)
    m = mlxtral.load(path, backend="mlx", tokenizer=False, dtype=dtype)
    assert m.backend.dtype == getattr(mx, dtype)
    got = m.logits(IDS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - ref).max() < tol * ref.std()


def test_dtype_errors(path: Path) -> None:
    with pytest.raises(UsageError, match="float32"):
        mlxtral.load(path, backend="numpy", tokenizer=False, dtype="float16")
    with pytest.raises(UsageError, match="unknown dtype .int8.: choose one of float16, bfloat16, float32"):
        mlxtral.load(path, backend="mlx", tokenizer=False, dtype="int8")
