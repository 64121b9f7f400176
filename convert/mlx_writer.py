"""MLX folder writer in mlx-lm's layout (what ``mlx_lm.convert`` produces for Mixtral).

- ``config.json``: the Hugging Face Mixtral keys plus ``"quantization": {"group_size", "bits"}``
  (also as ``quantization_config``, as mlx-lm writes it).
- ``model.safetensors`` or ``model-0000X-of-0000N.safetensors`` shards of at most 5 GB, and
  ``model.safetensors.index.json``.
- names after mlx-lm's Mixtral ``sanitize``: experts stacked ``[E, out, in]`` as
  ``model.layers.N.block_sparse_moe.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}``; the
  router ``block_sparse_moe.gate.weight`` and the norms unquantized (float32); attention, embeddings
  and ``lm_head`` affine-quantized. mlx-lm quantizes exactly the modules that have ``.scales``.
- q_proj/k_proj rows in Hugging Face's rotate-half order (mlx-lm runs ``rope_traditional=False``);
  the internal layout is interleaved, so they are permuted on the way out.
- tokenizer files copied from the source (``tokenizer.model``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``); a ``tokenizer.json`` and a
  ``tokenizer_config.json`` are written for a bare ``tokenizer.model``; from a GGUF source they
  are rebuilt from its vocabulary (see :mod:`tokenizer_files`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import FormatError, TokenizerError
from mlxtral.formats import Checkpoint
from mlxtral.qtensor import AffineTensor, QTensor, stored_qtype
from mlxtral.quant.affine import affine_dequantize, affine_quantize, affine_shapes, store_dtype
from mlxtral.quant.ggml import dequantize, squared_error_terms

from .policy import FLOAT32_SCALES, Precision, exact_repack, mlx_quantizes
from .preflight import same_affine
from .safetensors_writer import SafetensorsWriter
from .tensors import (
    TensorReport,
    check_tensors,
    layer_order,
    map_rows,
    release_pages,
    source_f32,
    worker_pool,
)

MAX_SHARD_BYTES = 5 << 30
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_GGUF_OF = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
Progress = Callable[[int], None]


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair rows -> Hugging Face rotate-half rows (q_proj/k_proj), ``[n_heads*hd, dim]``."""
    rows, dim = w.shape
    hd = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim))


def mlx_module_name(gguf_name: str, moe: bool) -> str:
    """GGUF-style output name -> mlx-lm module path (without ``.weight``)."""
    base = gguf_name.removesuffix(".weight")
    fixed = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if base in fixed:
        return fixed[base]
    _, i, rest = base.split(".", 2)
    p = f"model.layers.{i}."
    table = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
        "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
        "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    return p + table[rest]


@dataclass
class MlxModule:
    module: str
    parts: list[str]
    shape: tuple[int, ...]  # logical (stacked for experts)
    quantized: bool
    dtype: str  # float dtype of the weight (unquantized) or of scales/biases
    permute_heads: int = 0  # q/k: number of heads to permute rows by
    copy: bool = False  # MLX affine sources in this very quantization: codes, scales, biases copied
    exact: bool = False  # GGUF Q4_0/Q4_1/Q8_0 sources, groups of 32: repacked exactly (float16 scales)

    def tensors(self, bits: int | None, group_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        st = _ST_DTYPE[self.dtype]
        if not self.quantized:
            return {self.module + ".weight": (st, self.shape)}
        assert bits is not None
        wshape, sshape = affine_shapes(self.shape, bits, group_size)
        return {self.module + ".weight": ("U32", wshape), self.module + ".scales": (st, sshape),
                self.module + ".biases": (st, sshape)}


def plan_mlx(ckpt: Checkpoint, prec: Precision, group_size: int) -> list[MlxModule]:
    args = ckpt.args
    out = []
    for name, parts in layer_order(args):
        first = tuple(ckpt.tensors[parts[0]].shape)
        shape = (len(parts),) + first if name.endswith("_exps.weight") else first
        q = prec.bits is not None and mlx_quantizes(name, first, group_size)
        f32 = len(first) == 1 or name.endswith("ffn_gate_inp.weight")
        dtype = "float32" if f32 else prec.float_dtype
        heads = args.n_heads if ".attn_q." in name else args.n_kv_heads if ".attn_k." in name else 0
        srcs = [ckpt.tensors[p] for p in parts]
        copy = q and all(same_affine(t, prec.bits, group_size) for t in srcs) and len(
            {t.scale_dtype for t in srcs if isinstance(t, AffineTensor)}) == 1
        if copy:  # keep the source's scales as they are: no requantization, no rounding
            dtype = srcs[0].scale_dtype  # type: ignore[union-attr]
        kind = f"affine{prec.bits}/g{group_size}"
        exact = q and not copy and all(isinstance(t, QTensor) and exact_repack(t.qtype, kind) for t in srcs)
        if exact:  # the blocks' float16 scales, as they are (K-quants: their products, float32)
            dtype = "float32" if srcs[0].qtype in FLOAT32_SCALES else "float16"
        out.append(MlxModule(mlx_module_name(name, args.is_moe), parts, shape, q, dtype, heads, copy, exact))
    return out


def mlx_config(args: ModelArgs, prec: Precision, group_size: int) -> dict[str, object]:
    moe = args.is_moe
    cfg: dict[str, object] = {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "model_type": "mixtral" if moe else "mistral",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "sliding_window": args.sliding_window,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": prec.float_dtype,
    }
    if moe:
        cfg["num_local_experts"] = args.n_experts
        cfg["num_experts_per_tok"] = args.n_experts_per_tok
    if prec.bits is not None:
        q = {"group_size": group_size, "bits": prec.bits}
        cfg["quantization"] = q
        cfg["quantization_config"] = dict(q)
    return cfg


def shard_assignments(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive modules into shards of at most ``max_bytes`` (a bigger module gets its own)."""
    shards: list[list[str]] = [[]]
    cur = 0
    for name, size in sizes:
        if shards[-1] and cur + size > max_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(name)
        cur += size
    return shards


def copy_tokenizer(ckpt: Checkpoint, folder: Path) -> list[str]:
    """Copy the tokenizer files next to the weights; returns the names written."""
    tok = ckpt.tokenizer
    if tok is not None and tok.kind == "gguf":
        from .tokenizer_files import write_gguf_tokenizer

        return write_gguf_tokenizer(tok.metadata, folder, ckpt.args.max_position_embeddings)
    if tok is None or tok.path is None:
        raise TokenizerError("MLX output needs the tokenizer files (tokenizer.model / tokenizer.json) "
                             "beside the weights", ckpt.path)
    src = tok.path if tok.path.is_dir() else tok.path.parent
    written = []
    from mlxtral.formats.files import read_side_file  # regular files under a size cap: no FIFO, no /dev/zero

    if tok.kind == "sentencepiece" and tok.path.exists():
        (folder / "tokenizer.model").write_bytes(read_side_file(tok.path, TokenizerError))
        written.append("tokenizer.model")
    for n in TOKENIZER_FILES:
        if n not in written and (src / n).exists():
            (folder / n).write_bytes(read_side_file(src / n, TokenizerError))
            written.append(n)
    if "tokenizer.json" not in written and "tokenizer.model" in written:
        from .tokenizer_files import write_spm_tokenizer_json

        written += write_spm_tokenizer_json(folder / "tokenizer.model", folder)
    if "tokenizer_config.json" not in written and "tokenizer.model" in written:
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
               "model_max_length": ckpt.args.max_position_embeddings}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        written.append("tokenizer_config.json")
    if not written:
        raise TokenizerError("no tokenizer files found", src)
    return written


def _encode_part(x: np.ndarray, m: MlxModule, bits: int | None, group_size: int, rep: TensorReport
                 ) -> dict[str, np.ndarray]:
    """float32 ``[out, in]`` -> the module's stored arrays; row ranges in parallel (map_rows)."""
    if m.quantized:
        assert bits is not None

        def work(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
            wq, s, b = affine_quantize(x[lo:hi], bits, group_size, m.dtype)
            num, den = squared_error_terms(x[lo:hi], affine_dequantize(wq, s, b, bits, group_size, m.dtype))
            return wq, s, b, num, den

        parts = map_rows(work, x.shape[0], x.shape[-1])
        for p in parts:
            rep.num += p[3]
            rep.den += p[4]
        if len(parts) == 1:
            return {".weight": parts[0][0], ".scales": parts[0][1], ".biases": parts[0][2]}
        return {suffix: np.concatenate([p[i] for p in parts]) for i, suffix in
                enumerate((".weight", ".scales", ".biases"))}
    data = store_dtype(x, m.dtype)
    if m.dtype != "float32":
        rep.add_error(x, dequantize(data, _GGUF_OF[m.dtype]))
    return {".weight": data}


def _copy_affine(w: SafetensorsWriter, mod: str, e: int, src: AffineTensor, heads: int,
                 rep: TensorReport) -> None:
    """Write an MLX affine source tensor's codes, scales and biases unchanged (q/k rows in
    Hugging Face's order: rows move with their groups)."""
    for suffix, arr in ((".weight", src.data), (".scales", src.scales), (".biases", src.biases)):
        data = hf_permute(np.asarray(arr), heads) if heads else np.ascontiguousarray(arr)
        w.write(mod + suffix, data, offset=e * data.nbytes)
        rep.nbytes += data.nbytes
    rep.copied = True


def _repack_blocks(w: SafetensorsWriter, mod: str, e: int, src: QTensor, heads: int,
                   rep: TensorReport) -> None:
    """Write GGUF Q4_0/Q4_1/Q8_0 blocks as MLX affine groups of 32 with the same numbers
    (:func:`mlxtral.quant.gguf_affine.gguf_to_affine`: scale ``d``, bias ``m`` or ``-8d`` /
    ``-128d``; Q4_K/Q5_K: each sub-block's ``d*sc`` and ``-dmin*m`` in float32), q/k rows in
    Hugging Face's order."""
    from mlxtral.quant.gguf_affine import gguf_to_affine

    sdt = np.float32 if src.qtype in FLOAT32_SCALES else np.float16
    with np.errstate(over="ignore", invalid="ignore"):
        arrays = gguf_to_affine(src.data, src.qtype, tuple(src.shape), scale_dtype=sdt)
    if not np.isfinite(arrays[1]).all():  # the scale is the block's d as stored
        raise FormatError(f"tensor {mod}: its {src.qtype} blocks hold NaN or infinite scales (a damaged "
                          "file)")
    if not np.isfinite(arrays[2]).all():
        raise FormatError(f"tensor {mod}: a {src.qtype} block's scale is too large for the MLX bias (-8d or "
                          "-128d) to fit float16; convert to --bf16 or --f32 instead")
    for suffix, arr in zip((".weight", ".scales", ".biases"), arrays, strict=True):
        data = hf_permute(arr, heads) if heads else arr
        w.write(mod + suffix, data, offset=e * data.nbytes)
        rep.nbytes += data.nbytes
    rep.copied = True  # the same numbers, repacked


def write_mlx(ckpt: Checkpoint, folder: Path, prec: Precision, group_size: int = 64, *,
              max_shard_bytes: int = MAX_SHARD_BYTES, progress: Progress | None = None
              ) -> list[TensorReport]:
    """Write ``ckpt`` as an mlx-lm folder into the existing, empty ``folder`` (the caller makes it
    atomic). On an exception (KeyboardInterrupt, Terminated, OSError...) the open shard is closed
    without a completeness check, the worker threads are stopped, and the same exception goes on."""
    with worker_pool():
        return _write_mlx(ckpt, folder, prec, group_size, max_shard_bytes, progress)


def _write_mlx(ckpt: Checkpoint, folder: Path, prec: Precision, group_size: int, max_shard_bytes: int,
               progress: Progress | None) -> list[TensorReport]:
    check_tensors(ckpt.args, ckpt.tensors, str(ckpt.path))
    folder = Path(folder)
    copy_tokenizer(ckpt, folder)  # first: fail before hours of work, not after
    plan = plan_mlx(ckpt, prec, group_size)
    decl = {m.module: m.tensors(prec.bits, group_size) for m in plan}
    sizes = [(m.module, sum(SafetensorsWriter.nbytes(d, s) for d, s in decl[m.module].values()))
             for m in plan]
    shards = shard_assignments(sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    by_module = {m.module: m for m in plan}
    weight_map: dict[str, str] = {}
    reports: list[TensorReport] = []
    total = 0
    for fname, modules in zip(names, shards, strict=True):
        w = SafetensorsWriter(folder / fname, {"format": "mlx"})
        for mod in modules:
            for tname, (dt, shape) in decl[mod].items():
                w.declare(tname, dt, shape)
                weight_map[tname] = fname
        total += w.total_bytes
        with w:  # on an exception: w.abort(), the exception goes on unchanged
            w.open()
            for mod in modules:
                m = by_module[mod]
                kind = f"affine{prec.bits}/g{group_size}" if m.quantized else m.dtype
                rep = TensorReport(mod, kind, m.shape)
                for e, part in enumerate(m.parts):
                    src = ckpt.tensors[part]
                    rep.src_qtype = stored_qtype(src)
                    if m.copy and isinstance(src, AffineTensor):
                        _copy_affine(w, mod, e, src, m.permute_heads, rep)
                        if progress is not None:
                            progress(src.nbytes)
                        continue
                    if m.exact and isinstance(src, QTensor):
                        _repack_blocks(w, mod, e, src, m.permute_heads, rep)
                        if progress is not None:
                            progress(src.nbytes)
                        release_pages(src.data)
                        continue
                    x = source_f32(src)
                    if m.permute_heads:
                        x = hf_permute(x, m.permute_heads)
                    for suffix, data in _encode_part(x, m, prec.bits, group_size, rep).items():
                        w.write(mod + suffix, data, offset=e * data.nbytes)
                        rep.nbytes += data.nbytes
                    if progress is not None:
                        progress(src.nbytes)
                    del x
                    release_pages(src.data)
                reports.append(rep)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n", encoding="utf-8")
    cfg = mlx_config(ckpt.args, prec, group_size)
    (folder / "config.json").write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    return reports
