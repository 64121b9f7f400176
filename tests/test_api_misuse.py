"""The Python API refuses what is not token ids with a UsageError (an MlxtralError, as the README
promises), and answers to the names Hugging Face and mlx-lm tokenizers use."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_models import raw_gguf_tensors, tiny_args, write_raw_gguf

import mlxtral
from mlxtral.errors import MlxtralError, UsageError


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> mlxtral.Model:
    args = tiny_args()
    p = write_raw_gguf(tmp_path_factory.mktemp("api") / "m.gguf", raw_gguf_tensors(args, "Q8_0"), args,
                       vocab=True)
    return mlxtral.load(p, backend="numpy")


@pytest.mark.parametrize("bad", [[1.9, 5], [1, "415"], "hello", b"hi", [1, None], [True, 2], 5])
def test_logits_takes_token_ids_only(model: mlxtral.Model, bad) -> None:
    with pytest.raises(UsageError, match="takes a list of token ids"):
        model.logits(bad)


def test_logits_errors_are_mlxtral_errors(model: mlxtral.Model) -> None:
    with pytest.raises(MlxtralError, match="at least one token"):
        model.logits([])
    with pytest.raises(MlxtralError, match="outside the vocabulary"):
        model.logits([1, 32000])
    assert model.logits((1, np.int64(3))).shape == (2, 32000)


def test_tokenizer_answers_to_hf_names(model: mlxtral.Model) -> None:
    tok = model.tokenizer
    assert tok.eos_token_id == tok.eos_id == 2 and tok.bos_token_id == tok.bos_id == 1
    assert tok.eos_token_ids == set(tok.eos_ids) and tok.eos_id in tok.eos_token_ids


