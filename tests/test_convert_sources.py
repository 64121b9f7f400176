"""Converting from quantized sources the NumPy kernels do not compute on: a Q4_K_M-style GGUF and
mlx-lm folders of any bit width. Each source tensor is decoded row range by row range as it is
written (no F16 copy of the model first); F32 output must equal the source's own values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import Q4_K_M, random_weights, raw_gguf_tensors, tiny_args, write_mlx, write_raw_gguf

from mlxtral.convert import convert
from mlxtral.formats.detect import open_checkpoint

K_ARGS = dict(dim=256, hidden_dim=256, n_heads=8, n_kv_heads=4, head_dim=32)


def assert_values_equal(out: Path, src: Path, atol: float = 0.0) -> None:
    got, want = open_checkpoint(out), open_checkpoint(src)
    assert set(got.tensors) == set(want.tensors)
    for name, t in want.tensors.items():
        np.testing.assert_allclose(got.tensors[name].dequantize(), t.dequantize(), atol=atol, rtol=0,
                                   err_msg=name)


def test_kquant_gguf_to_f32_is_exact_and_to_q8_verifies(tmp_path: Path) -> None:
    args = tiny_args(**K_ARGS)
    src = write_raw_gguf(tmp_path / "k.gguf", raw_gguf_tensors(args, Q4_K_M, seed=1), args, vocab=True)
    assert open_checkpoint(src).tensors["blk.0.ffn_down.1.weight"].qtype == "Q6_K"
    r = convert(src, tmp_path / "f32.gguf", qtype="f32", progress=False)
    assert {x.src_qtype for x in r.reports} >= {"Q4_K", "Q6_K"}
    assert_values_equal(tmp_path / "f32.gguf", src)
    r = convert(src, tmp_path / "q8.gguf", qtype="q8", verify=True, progress=False, allow_requantize=True)
    assert r.verified


@pytest.mark.parametrize("bits,gs", [(3, 32), (4, 64), (8, 128)])
def test_mlx_folder_to_gguf(tmp_path: Path, bits: int, gs: int) -> None:
    pytest.importorskip("mlx.core")
    args = tiny_args(dim=128, head_dim=32)
    folder, _ = write_mlx(tmp_path / "mlx", random_weights(args, seed=2), args, bits=bits, group_size=gs)
    convert(folder, tmp_path / "f32.gguf", qtype="f32", progress=False)
    assert_values_equal(tmp_path / "f32.gguf", folder)  # q/k rows un-permuted with their groups
    assert convert(folder, tmp_path / "q4.gguf", qtype="q4", verify=True, progress=False,
                   allow_requantize=True).verified


@pytest.mark.parametrize("out", ["out.gguf", "mlx_out"])
def test_summary_names_the_stored_type_of_norms(tmp_path: Path, out: str) -> None:
    """Norms and the router are held as float32 once loaded; the table's source column still says
    what the file stores (BF16 here), and the output column what was written."""
    from tiny_models import write_hf

    if out == "mlx_out":
        pytest.importorskip("mlx.core")
    args = tiny_args()
    src = write_hf(tmp_path / "hf", random_weights(args, seed=3), args, dtype="bf16")
    r = convert(src, tmp_path / out, qtype="q8" if out.endswith(".gguf") else "q4", progress=False)
    by_name = {x.name: x for x in r.reports}
    norm = next(x for n, x in by_name.items() if "attn_norm" in n or "input_layernorm" in n)
    assert norm.src_qtype == "BF16"
    assert {x.src_qtype for x in r.reports} == {"BF16"}


def test_a_source_without_a_tokenizer_is_named(tmp_path: Path) -> None:
    from tiny_models import write_hf

    from mlxtral.errors import TokenizerError

    args = tiny_args()
    src = write_hf(tmp_path / "hf", random_weights(args, seed=3), args, tokenizer=False)
    with pytest.raises(TokenizerError) as e:
        convert(src, tmp_path / "out.gguf", qtype="q8", progress=False)
    assert str(e.value).startswith(f"{src}: the source has no tokenizer")
    assert not (tmp_path / "out.gguf").exists()


def test_q4_k_to_mlx_is_an_exact_repack(tmp_path: Path) -> None:
    """Q4_K's 32-weight sub-blocks are affine 4-bit groups: scale d*sc, bias -dmin*m, exact in
    float32 scales. --q4 --group-size 32 writes them without requantizing (it was a 7.6% relative
    RMSE requantization that needed --allow-requantize), equal to the source's values."""
    pytest.importorskip("mlx.core")
    args = tiny_args(**K_ARGS)
    src = write_raw_gguf(tmp_path / "k.gguf", raw_gguf_tensors(args, {"ffn_": "Q4_K", "*": "Q8_0"}, seed=1),
                         args, vocab=True)
    out = tmp_path / "mlx"
    r = convert(src, out, "mlx", "q4", group_size=32, progress=False, allow_requantize=True)  # Q8_0 -> 4
    reps = {x.name: x for x in r.reports}
    assert all(x.copied for n, x in reps.items() if "switch_mlp" in n), reps
    got, want = open_checkpoint(out), open_checkpoint(src)
    for e in range(args.n_experts):
        name = f"blk.1.ffn_down.{e}.weight"
        assert got.tensors[name].qtype == "affine4/g32"
        np.testing.assert_array_equal(got.tensors[name].dequantize(), want.tensors[name].dequantize())
    # a pure Q4_K body needs no --allow-requantize
    src4 = write_raw_gguf(tmp_path / "k4.gguf", raw_gguf_tensors(args, {"*": "Q4_K"}, seed=2), args,
                          vocab=True)
    convert(src4, tmp_path / "mlx4", "mlx", "q4", group_size=32, progress=False)
