"""Checkpoint formats: each loader maps its file's names, once, into one internal layout.

The internal layout is a flat ``dict[str, QTensor | AffineTensor]`` keyed by GGUF-style names,
each tensor as the file stores it (GGUF blocks of any type, MLX affine codes; converted per tensor
by whoever needs another form: :mod:`mlxtral.formats.native`), with experts always one 2-D tensor
each (merged GGUF ``ffn_*_exps`` tensors are split into zero-copy views):

====================================  =========================  ============================
name                                  shape (NumPy, out x in)    notes
====================================  =========================  ============================
``token_embd.weight``                 ``[vocab, dim]``
``output_norm.weight``                ``[dim]``                  F32
``output.weight``                     ``[vocab, dim]``           absent when embeddings are tied
``blk.N.attn_norm.weight``            ``[dim]``                  F32
``blk.N.attn_q.weight``               ``[n_heads*head_dim, dim]`` interleaved-pair RoPE layout
``blk.N.attn_k.weight``               ``[n_kv*head_dim, dim]``   interleaved-pair RoPE layout
``blk.N.attn_v.weight``               ``[n_kv*head_dim, dim]``
``blk.N.attn_output.weight``          ``[dim, n_heads*head_dim]``
``blk.N.ffn_norm.weight``             ``[dim]``                  F32
``blk.N.ffn_gate_inp.weight``         ``[n_experts, dim]``       router, F32; MoE only
``blk.N.ffn_gate.E.weight``           ``[hidden, dim]``          w1; E = 0 only for a dense model
``blk.N.ffn_up.E.weight``             ``[hidden, dim]``          w3
``blk.N.ffn_down.E.weight``           ``[dim, hidden]``          w2
====================================  =========================  ============================

RoPE: the original and GGUF files keep the interleaved-pair layout (rotate x[2i], x[2i+1]);
the HF loader undoes HF's q/k row permutation, so every backend applies one convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxtral.config import ModelArgs
from mlxtral.qtensor import Tensor

VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges")


@dataclass
class TokenizerSource:
    """Where the tokenizer comes from.

    kind: ``"sentencepiece"`` (``path`` is a ``tokenizer.model``), ``"gguf"`` (``metadata`` holds
    the ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` keys), or ``"hf"`` (``path`` is a
    folder with ``tokenizer.json``/``tokenizer.model``). ``folder``: the HF folder whose
    ``tokenizer_config.json`` and ``chat_template.*`` go with a ``tokenizer.model``.
    """

    kind: str
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


@dataclass
class Checkpoint:
    format: str  # "gguf" | "hf" | "original" | "mlx"
    path: Path
    args: ModelArgs
    tensors: dict[str, Tensor]  # internal names, see the module docstring
    tokenizer: TokenizerSource | None
    metadata: dict[str, Any] = field(default_factory=dict)  # format-specific extras (GGUF kv, ...)
    keepalive: list[Any] = field(default_factory=list)  # open mmaps/readers backing the tensors

    def drop_vocabulary(self) -> None:
        """Forget the GGUF vocabulary arrays (pieces, scores, types, merges) once a tokenizer has been
        made from them; the other keys (and the chat template) stay."""
        for md in (self.metadata, self.tokenizer.metadata if self.tokenizer is not None else None):
            for key in VOCABULARY_KEYS:
                if md:
                    md.pop(key, None)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with ``args`` needs, with its shape (``output.weight`` only if untied)."""
    d, hd, v, h = args.dim, args.head_dim, args.vocab_size, args.hidden_dim
    s: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (v, d),
        "output_norm.weight": (d,),
    }
    if not args.tie_word_embeddings:
        s["output.weight"] = (v, d)
    for i in range(args.n_layers):
        b = f"blk.{i}."
        s[b + "attn_norm.weight"] = (d,)
        s[b + "attn_q.weight"] = (args.n_heads * hd, d)
        s[b + "attn_k.weight"] = (args.n_kv_heads * hd, d)
        s[b + "attn_v.weight"] = (args.n_kv_heads * hd, d)
        s[b + "attn_output.weight"] = (d, args.n_heads * hd)
        s[b + "ffn_norm.weight"] = (d,)
        if args.is_moe:
            s[b + "ffn_gate_inp.weight"] = (args.n_experts, d)
        for e in range(args.n_ffn):
            s[b + f"ffn_gate.{e}.weight"] = (h, d)
            s[b + f"ffn_up.{e}.weight"] = (h, d)
            s[b + f"ffn_down.{e}.weight"] = (d, h)
    return s
