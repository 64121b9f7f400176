"""Mistral original folder loader: ``params.json`` + ``consolidated.*.pth`` or ``consolidated.safetensors``.

Names -> internal names (see :mod:`mlxtral.formats`):

- ``tok_embeddings.weight`` -> ``token_embd.weight``; ``norm.weight`` -> ``output_norm.weight``;
  ``output.weight`` -> ``output.weight``
- ``layers.N.attention.{wq,wk,wv,wo}.weight`` -> ``blk.N.attn_{q,k,v,output}.weight``
- ``layers.N.{attention_norm,ffn_norm}.weight`` -> ``blk.N.{attn,ffn}_norm.weight``
- ``layers.N.feed_forward.gate.weight`` -> ``blk.N.ffn_gate_inp.weight`` (float32)
- ``layers.N.feed_forward.experts.E.{w1,w3,w2}.weight`` -> ``blk.N.ffn_{gate,up,down}.E.weight``
- dense: ``layers.N.feed_forward.{w1,w3,w2}.weight`` -> ``blk.N.ffn_{gate,up,down}.0.weight``

q/k are already in the interleaved-pair RoPE layout: no permutation. ``.pth`` shards are read
with the restricted unpickler (torch is not needed); each shard must hold whole tensors.
"""
from __future__ import annotations

import re
from pathlib import Path

from mlxtral.config import ModelArgs, read_json
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint, TokenizerSource
from mlxtral.formats.detect import validate_shapes, validate_tensors
from mlxtral.formats.hf import finish, load_shards, rename, to_qtensor
from mlxtral.qtensor import QTensor

_L = r"^layers\.(\d+)\."
ORIGINAL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^tok_embeddings\.weight$"), "token_embd.weight"),
    (re.compile(r"^norm\.weight$"), "output_norm.weight"),
    (re.compile(r"^output\.weight$"), "output.weight"),
    (re.compile(_L + r"attention\.wq\.weight$"), r"blk.\1.attn_q.weight"),
    (re.compile(_L + r"attention\.wk\.weight$"), r"blk.\1.attn_k.weight"),
    (re.compile(_L + r"attention\.wv\.weight$"), r"blk.\1.attn_v.weight"),
    (re.compile(_L + r"attention\.wo\.weight$"), r"blk.\1.attn_output.weight"),
    (re.compile(_L + r"attention_norm\.weight$"), r"blk.\1.attn_norm.weight"),
    (re.compile(_L + r"ffn_norm\.weight$"), r"blk.\1.ffn_norm.weight"),
    (re.compile(_L + r"feed_forward\.gate\.weight$"), r"blk.\1.ffn_gate_inp.weight"),
    (re.compile(_L + r"feed_forward\.experts\.(\d+)\.w1\.weight$"), r"blk.\1.ffn_gate.\2.weight"),
    (re.compile(_L + r"feed_forward\.experts\.(\d+)\.w3\.weight$"), r"blk.\1.ffn_up.\2.weight"),
    (re.compile(_L + r"feed_forward\.experts\.(\d+)\.w2\.weight$"), r"blk.\1.ffn_down.\2.weight"),
    (re.compile(_L + r"feed_forward\.w1\.weight$"), r"blk.\1.ffn_gate.0.weight"),
    (re.compile(_L + r"feed_forward\.w3\.weight$"), r"blk.\1.ffn_up.0.weight"),
    (re.compile(_L + r"feed_forward\.w2\.weight$"), r"blk.\1.ffn_down.0.weight"),
]


def original_weight_files(folder: Path) -> list[Path]:
    """``consolidated.safetensors`` (preferred: no pickle) or every ``consolidated.*.pth`` shard."""
    st = sorted(folder.glob("consolidated*.safetensors"))
    if st:
        return st
    pth = sorted(folder.glob("consolidated*.pth"))
    if pth:
        return pth
    raise FormatError("no consolidated.*.pth or consolidated.safetensors weights", folder)


def original_tokenizer(folder: Path) -> TokenizerSource | None:
    """``tokenizer.model``, else the newest ``tokenizer.model.v*``, else ``tekken.json`` (Mistral NeMo...)."""
    if (folder / "tokenizer.model").exists():  # the tokenizer loader refuses a non-file by name
        return TokenizerSource("sentencepiece", folder / "tokenizer.model")
    versions = sorted(folder.glob("tokenizer.model.v*"), key=lambda p: (len(p.name), p.name))
    if versions:
        return TokenizerSource("sentencepiece", versions[-1])
    if (folder / "tekken.json").exists():
        return TokenizerSource("tekken", folder / "tekken.json")
    return None


def load_original(path: str | Path) -> Checkpoint:
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError("not a folder (a Mistral original checkpoint is a folder with params.json)", folder)
    params_path = folder / "params.json"
    params = read_json(params_path)
    args = ModelArgs.from_params_json(params, params_path)
    files = original_weight_files(folder)
    raw, keep = load_shards(folder, files)
    tensors: dict[str, QTensor] = {}
    for name, t in raw.items():
        new = rename(name, ORIGINAL_RULES)
        if new is None:
            continue
        tensors[new] = to_qtensor(t, name, folder)
    if params.get("tied_embeddings") is True and "output.weight" not in tensors:
        args.tie_word_embeddings = True  # newer small Mistral models; Mixtral never ties
    validate_shapes({n: q.shape for n, q in tensors.items()}, args, folder)  # before any copy
    tensors = finish(tensors, args, hf_qk=False)
    ckpt = Checkpoint("original", folder, args, tensors, original_tokenizer(folder),
                      metadata={"params": params}, keepalive=keep)
    validate_tensors(ckpt)
    return ckpt
