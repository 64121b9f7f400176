"""Hugging Face folder loader: ``config.json`` + single or sharded safetensors, names mapped once.

HF names -> internal names (see :mod:`mlxtral.formats`):

- ``model.embed_tokens.weight`` -> ``token_embd.weight``; ``model.norm.weight`` -> ``output_norm.weight``;
  ``lm_head.weight`` -> ``output.weight`` (absent with ``tie_word_embeddings``)
- ``model.layers.N.self_attn.{q,k,v,o}_proj.weight`` -> ``blk.N.attn_{q,k,v,output}.weight``
- ``model.layers.N.{input_layernorm,post_attention_layernorm}.weight`` -> ``blk.N.{attn,ffn}_norm.weight``
- ``model.layers.N.block_sparse_moe.gate.weight`` -> ``blk.N.ffn_gate_inp.weight`` (float32)
- ``model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` -> ``blk.N.ffn_{gate,up,down}.E.weight``
- dense: ``model.layers.N.mlp.{gate,up,down}_proj.weight`` -> ``blk.N.ffn_{gate,up,down}.0.weight``

HF stores q_proj/k_proj rows permuted for its rotate-half RoPE
(``hf = w.reshape(heads, hd // 2, 2, dim).transpose(0, 2, 1, 3).reshape(-1, dim)``); the loader
undoes it so that every format arrives in the interleaved-pair layout. Those two tensors (and the
small norms and routers, converted to float32) are copies; every other weight is a zero-copy view
of the memory-mapped file (bf16 as a ``BF16`` QTensor of the raw bits).

``pytorch_model.bin`` folders (torch zip, read with the restricted unpickler) load the same way.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.config import ModelArgs, read_json
from mlxtral.display import plain, show
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint, TokenizerSource
from mlxtral.formats.detect import validate_shapes, validate_tensors
from mlxtral.formats.files import read_side_json
from mlxtral.formats.safetensors import SafeTensor, open_safetensors
from mlxtral.formats.torch_zip import load_torch_zip
from mlxtral.qtensor import F32_NAMES, AffineTensor, QTensor, Tensor, as_f32

_L = r"^model\.layers\.(\d+)\."
HF_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "token_embd.weight"),
    (re.compile(r"^model\.norm\.weight$"), "output_norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "output.weight"),
    (re.compile(_L + r"input_layernorm\.weight$"), r"blk.\1.attn_norm.weight"),
    (re.compile(_L + r"post_attention_layernorm\.weight$"), r"blk.\1.ffn_norm.weight"),
    (re.compile(_L + r"self_attn\.q_proj\.weight$"), r"blk.\1.attn_q.weight"),
    (re.compile(_L + r"self_attn\.k_proj\.weight$"), r"blk.\1.attn_k.weight"),
    (re.compile(_L + r"self_attn\.v_proj\.weight$"), r"blk.\1.attn_v.weight"),
    (re.compile(_L + r"self_attn\.o_proj\.weight$"), r"blk.\1.attn_output.weight"),
    (re.compile(_L + r"block_sparse_moe\.gate\.weight$"), r"blk.\1.ffn_gate_inp.weight"),
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w1\.weight$"), r"blk.\1.ffn_gate.\2.weight"),
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w3\.weight$"), r"blk.\1.ffn_up.\2.weight"),
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w2\.weight$"), r"blk.\1.ffn_down.\2.weight"),
    (re.compile(_L + r"mlp\.gate_proj\.weight$"), r"blk.\1.ffn_gate.0.weight"),
    (re.compile(_L + r"mlp\.up_proj\.weight$"), r"blk.\1.ffn_up.0.weight"),
    (re.compile(_L + r"mlp\.down_proj\.weight$"), r"blk.\1.ffn_down.0.weight"),
]
# Buffers some old checkpoints saved: recomputed from the config, never weights.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.inner_attention\.rope\.freqs|^rope\.freqs)$")
_QK = re.compile(r"^blk\.\d+\.attn_([qk])\.weight$")


def rename(name: str, rules: Iterable[tuple[re.Pattern[str], str]]) -> str | None:
    """The internal name for ``name``; the name itself if no rule knows it; None if ignorable."""
    if IGNORED.search(name):
        return None
    for pat, repl in rules:
        if pat.match(name):
            return pat.sub(repl, name)
    return name


# ---- q/k permutation ---------------------------------------------------------------------------
def permute_rows(data: np.ndarray, n_heads: int, inverse: bool) -> np.ndarray:
    """HF's q/k row permutation on the rows (axis 0) of ``data``, or its inverse. Returns a copy.

    forward (interleaved -> HF): rows of each head go (hd/2, 2) -> (2, hd/2);
    inverse (HF -> interleaved): (2, hd/2) -> (hd/2, 2). Works on any row layout (float values,
    bf16 bits, quantized blocks), since whole rows move.
    """
    rows = data.shape[0]
    hd = rows // n_heads
    a, b = (hd // 2, 2) if not inverse else (2, hd // 2)
    grouped = data.reshape(n_heads, a, b, *data.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(data.shape)


def unpermute_qk(q: Tensor, n_heads: int) -> Tensor:
    """An HF-layout q/k weight in the interleaved-pair layout (a copy). Wrong shapes pass through
    unchanged: :func:`validate_tensors` reports them."""
    if q.ndim != 2 or q.shape[0] % n_heads or (q.shape[0] // n_heads) % 2:
        return q
    if isinstance(q, AffineTensor):  # rows carry their own groups: move codes, scales, biases
        order = permute_rows(np.arange(q.shape[0]), n_heads, inverse=True)
        return q.take_rows(order)
    return QTensor(q.qtype, q.shape, permute_rows(q.data, n_heads, inverse=True))


def to_qtensor(t: SafeTensor, name: str, path: Path) -> QTensor:
    if t.dtype in ("F32", "F16", "BF16", "F64"):
        return t.qtensor()
    raise FormatError(f"tensor {show(name)} has dtype {t.dtype}: not a float weight (a quantized checkpoint "
                      "of a kind mlxtral does not read?)", path)


def finish(tensors: dict[str, Tensor], args: ModelArgs, hf_qk: bool) -> dict[str, Tensor]:
    """Common last step: norms and routers to float32, HF q/k rows back to interleaved."""
    out: dict[str, Tensor] = {}
    for name, q in tensors.items():
        if F32_NAMES.search(name):
            q = as_f32(q)
        elif hf_qk and (m := _QK.match(name)):
            q = unpermute_qk(q, args.n_heads if m[1] == "q" else args.n_kv_heads)
        out[name] = q
    return out


# ---- shards ------------------------------------------------------------------------------------
def open_weight_file(path: Path) -> tuple[dict[str, SafeTensor], Any]:
    """A ``.safetensors`` or torch-zip (``.bin``/``.pth``) file: (tensors, object to keep alive)."""
    if path.suffix == ".safetensors":
        st = open_safetensors(path)
        return st.tensors, st
    return load_torch_zip(path)


def load_shards(folder: Path, files: list[Path], index: dict[str, str] | None = None,
                index_path: Path | None = None) -> tuple[dict[str, SafeTensor], list[Any]]:
    """Every tensor of ``files`` (a name appearing twice is an error), checked against ``index``."""
    for f in files:
        if not f.is_file():
            what = ("is a folder" if f.is_dir() else "is not a regular file (a pipe, device or socket)"
                    if f.exists() else "is missing (incomplete download?)")
            raise FormatError(f"shard {plain(f.name)} {what}", f)
    tensors: dict[str, SafeTensor] = {}
    where: dict[str, str] = {}
    keep: list[Any] = []
    for f in files:
        ts, k = open_weight_file(f)
        keep.append(k)
        for name, t in ts.items():
            if name in tensors:
                raise FormatError(f"tensor {show(name)} is in both {plain(where[name])} and {plain(f.name)} "
                                  "(tensor-parallel shards are not supported)", folder)
            tensors[name] = t
            where[name] = f.name
    if index is not None:
        for name, shard in index.items():
            if where.get(name) != shard:
                raise FormatError(f"index lists tensor {show(name)} in {plain(shard)}, but that shard does "
                                  "not hold it", index_path)
    return tensors, keep


def read_index(index_path: Path) -> dict[str, str]:
    data = read_side_json(index_path, unique_keys=True)  # regular file, size cap, one-line FormatError
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError("shard index has no weight_map of names to files", index_path)
    for v in wm.values():
        if "/" in v or "\\" in v or v.startswith("."):
            raise FormatError(f"shard index names a file outside the folder: {show(v)}", index_path)
    return wm


def find_weight_files(folder: Path, stems: tuple[str, ...] = ("model", "pytorch_model")
                      ) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The weight files of an HF/MLX folder: (files, index weight_map or None, index path)."""
    for stem, ext in ((s, e) for s in stems for e in (".safetensors", ".bin")):
        if stem == "pytorch_model" and ext == ".safetensors":
            continue
        idx = folder / f"{stem}{ext}.index.json"
        if idx.exists():  # a FIFO or a folder is refused by read_index, not skipped
            wm = read_index(idx)
            files = [folder / n for n in sorted(set(wm.values()))]
            return files, wm, idx
        single = folder / f"{stem}{ext}"
        if single.is_file():
            return [single], None, None
    files = sorted(folder.glob("model*.safetensors"))
    if files:
        return files, None, None
    raise FormatError("no weights found (expected model.safetensors, model.safetensors.index.json with its "
                      "shards, or pytorch_model.bin)", folder)


def hf_tokenizer(folder: Path) -> TokenizerSource | None:
    if (folder / "tokenizer.model").exists():  # the tokenizer loader refuses a non-file by name
        # tokenizer_config.json / chat_template.* are read by the tokenizer loader (from ``folder``)
        return TokenizerSource("sentencepiece", folder / "tokenizer.model", folder=folder)
    if (folder / "tokenizer.json").exists():
        return TokenizerSource("hf", folder)
    return None


# ---- loader ------------------------------------------------------------------------------------
def load_hf(path: str | Path) -> Checkpoint:
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError("not a folder (an HF checkpoint is a folder with config.json)", folder)
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    if isinstance(cfg.get("quantization_config"), dict) and "quantization" not in cfg:
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise FormatError(f"quantized HF checkpoint ({show(method)}) is not supported; use the original bf16 "
                          "weights, a GGUF or an MLX folder", cfg_path)
    args = ModelArgs.from_hf_config(cfg, cfg_path)
    files, index, index_path = find_weight_files(folder)
    raw, keep = load_shards(folder, files, index, index_path)
    tensors: dict[str, QTensor] = {}
    for name, t in raw.items():
        new = rename(name, HF_RULES)
        if new is None:
            continue
        tensors[new] = to_qtensor(t, name, files[0].parent)
    if "output.weight" in tensors:
        args.tie_word_embeddings = False  # a stored lm_head is the output matrix, tied or not
    validate_shapes({n: q.shape for n, q in tensors.items()}, args, folder)  # before any copy
    tensors = finish(tensors, args, hf_qk=True)
    ckpt = Checkpoint("hf", folder, args, tensors, hf_tokenizer(folder), metadata={"config": cfg},
                      keepalive=keep)
    validate_tensors(ckpt)
    return ckpt
