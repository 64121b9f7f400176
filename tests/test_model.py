"""The NumPy forward pass: grouped MoE vs the naive loop, KV cache vs full forward, transformers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
from tiny_models import BACKENDS

import mlxtral
from mlxtral.backends import ops
from mlxtral.backends.numpy_backend import NumpyBackend
from mlxtral.config import ModelArgs
from mlxtral.errors import ContextOverflowError, UsageError
from mlxtral.formats import expected_shapes
from mlxtral.qtensor import QTensor


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=300,
                n_experts=4, n_experts_per_tok=2, rope_theta=1e4, max_position_embeddings=256)
    base.update(kw)
    return ModelArgs(**base)


def random_tensors(args: ModelArgs, seed: int = 0, qtype: str = "F32") -> dict[str, QTensor]:
    import gguf

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            x = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            x = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if len(shape) == 1 or "gate_inp" in name or qtype == "F32":
            out[name] = QTensor.from_float(x)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            out[name] = QTensor(qtype, shape, gguf.quants.quantize(x, t))
    return out


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_moe_equals_naive_loop(qtype: str, k: int) -> None:
    args = tiny_args(n_experts_per_tok=k)
    be = NumpyBackend(args, random_tensors(args, qtype=qtype))
    x = np.random.default_rng(1).standard_normal((13, args.dim)).astype(np.float32)
    for li in range(args.n_layers):
        fast = be.moe(x, be.layers[li], li)
        ref = be.moe_naive(x, li)
        tol = 1e-4 if qtype == "F32" else 2e-2 * np.abs(ref).max()
        np.testing.assert_allclose(fast, ref, atol=tol, rtol=0)
    assert be.expert_counts.sum() == 13 * k * args.n_layers


def test_dense_model_runs_as_one_expert() -> None:
    args = tiny_args(n_experts=0, n_experts_per_tok=0)
    be = NumpyBackend(args, random_tensors(args))
    x = np.random.default_rng(2).standard_normal((5, args.dim)).astype(np.float32)
    np.testing.assert_allclose(be.moe(x, be.layers[0], 0), be.moe_naive(x, 0), atol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_cached_decoding_equals_full_forward(kv_dtype: str) -> None:
    args = tiny_args()
    be = NumpyBackend(args, random_tensors(args), kv_dtype=kv_dtype)
    ids = [1, 17, 42, 99, 5, 250, 3, 77, 8, 120]
    full = be.forward(ids, be.new_cache(32), all_logits=True)  # [T, vocab]
    cache = be.new_cache(32)
    rows = [be.forward(ids[:4], cache)]  # prefill 4, then one at a time
    for t in ids[4:]:
        rows.append(be.forward([t], cache))
    inc = np.stack(rows)
    tol = 1e-4 if kv_dtype == "float32" else 5e-3
    np.testing.assert_allclose(inc, full[3:], atol=tol, rtol=0)


def test_chunked_prefill_equals_one_shot() -> None:
    args = tiny_args()
    be = NumpyBackend(args, random_tensors(args))
    ids = list(range(1, 40))
    one = be.forward(ids, be.new_cache(64))
    cache = be.new_cache(64)
    for s in range(0, len(ids), 7):
        last = be.forward(ids[s : s + 7], cache)
    np.testing.assert_allclose(last, one, atol=1e-4)


def test_route_matches_softmax_then_renormalise() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    router = rng.standard_normal((6, 8)).astype(np.float32)
    idx, w = ops.route(x, router, 2)
    logits = x @ router.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for t in range(20):
        top = np.argsort(-logits[t])[:2]
        assert list(idx[t]) == list(top)
        np.testing.assert_allclose(w[t], p[t, top] / p[t, top].sum(), rtol=1e-5)


def test_attention_matches_naive() -> None:
    rng = np.random.default_rng(4)
    T, S, H, KV, hd = 3, 7, 4, 2, 8
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k = rng.standard_normal((S, KV, hd)).astype(np.float32)
    v = rng.standard_normal((S, KV, hd)).astype(np.float32)
    out = ops.attention(q, k, v, S - T)
    for t in range(T):
        for h in range(H):
            kv = h // (H // KV)
            n = S - T + t + 1
            s = k[:n, kv] @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h * hd : (h + 1) * hd], p @ v[:n, kv], atol=1e-5)


def test_context_overflow_is_a_clear_error() -> None:
    args = tiny_args()
    be = NumpyBackend(args, random_tensors(args))
    with pytest.raises(ContextOverflowError, match="context"):
        be.forward(list(range(1, 12)), be.new_cache(8))


def test_matches_transformers_mixtral() -> None:
    """Same random weights in transformers' MixtralForCausalLM: logits within 1e-3."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, rope_theta=1e4, max_position_embeddings=256,
                           initializer_range=0.3)
    m = tr.MixtralForCausalLM(cfg).eval()
    args = ModelArgs.from_hf_config(cfg.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}

    def unperm(w: np.ndarray, n: int) -> np.ndarray:  # HF rotate-half rows -> interleaved pairs
        return w.reshape(n, 2, args.head_dim // 2, args.dim).transpose(0, 2, 1, 3).reshape(-1, args.dim)

    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(args.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        t[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        t[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        t[b + "attn_q.weight"] = unperm(sd[p + "self_attn.q_proj.weight"], args.n_heads)
        t[b + "attn_k.weight"] = unperm(sd[p + "self_attn.k_proj.weight"], args.n_kv_heads)
        t[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        t[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        if p + "mlp.gate.weight" in sd:  # transformers 5: fused experts
            t[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
            gu = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2h, d]
            dn = sd[p + "mlp.experts.down_proj"]  # [E, d, h]
            for e in range(args.n_experts):
                t[b + f"ffn_gate.{e}.weight"] = gu[e, : args.hidden_dim]
                t[b + f"ffn_up.{e}.weight"] = gu[e, args.hidden_dim :]
                t[b + f"ffn_down.{e}.weight"] = dn[e]
        else:
            t[b + "ffn_gate_inp.weight"] = sd[p + "block_sparse_moe.gate.weight"]
            for e in range(args.n_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                t[b + f"ffn_gate.{e}.weight"] = sd[q + "w1.weight"]
                t[b + f"ffn_up.{e}.weight"] = sd[q + "w3.weight"]
                t[b + f"ffn_down.{e}.weight"] = sd[q + "w2.weight"]
    be = NumpyBackend(args, {k: QTensor.from_float(np.ascontiguousarray(v)) for k, v in t.items()})
    ids = [1, 5, 77, 200, 299, 4, 8, 123, 42, 7, 19, 250]
    ours = be.forward(ids, be.new_cache(32), all_logits=True)
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(ref).max() > 0.5  # a meaningful comparison, not all zeros
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ---- through mlxtral.load --------------------------------------------------------------------------


def _tiny_gguf(path: Path, seed: int = 0, **kw) -> Path:
    """A tiny 4-expert top-2 GGUF (F32, no vocabulary: load it with ``tokenizer=False``)."""
    args = tm.tiny_args(vocab_size=512, **kw)
    return tm.write_gguf(path, tm.random_weights(args, seed=seed), args, vocab=False)


def _assert_cache_holds_exactly(model: mlxtral.Model, n: int) -> None:
    """The session cache (the one stream() uses) takes position n - 1 and refuses position n."""
    cache = model.new_session().cache
    assert cache.max_context == n
    if model.backend_name == "numpy":
        a = model.config
        assert cache.k.shape == cache.v.shape == (a.n_layers, a.n_kv_heads, n, a.head_dim)
    cache.offset = n - 1
    assert model.backend.forward([1], cache).shape == (model.config.vocab_size,)
    assert cache.offset == n
    if model.backend_name == "mlx":
        assert cache.capacity == n
    with pytest.raises(ContextOverflowError, match="context"):
        model.backend.forward([1], cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("model_ctx", "expected"), [(32768, 4096), (1024, 1024)])
def test_default_kv_cache_is_the_smaller_of_the_model_context_and_4096(
        tmp_path: Path, backend: str, model_ctx: int, expected: int) -> None:
    path = _tiny_gguf(tmp_path / "m.gguf", max_position_embeddings=model_ctx)
    model = mlxtral.load(path, backend=backend, tokenizer=False)
    assert model.config.max_position_embeddings == model_ctx
    assert model.max_context == expected
    _assert_cache_holds_exactly(model, expected)
    # an explicit size up to the model's context is taken as asked, above the 4096 default too
    asked = min(model_ctx, 8192)
    model = mlxtral.load(path, backend=backend, tokenizer=False, max_context=asked)
    assert model.max_context == asked and model.new_session().cache.max_context == asked
    model = mlxtral.load(path, backend=backend, tokenizer=False, max_context=100)
    _assert_cache_holds_exactly(model, 100)


def test_max_context_beyond_the_model_is_a_usage_error(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "m.gguf", max_position_embeddings=1024)
    with pytest.raises(UsageError, match="max_context 1025 exceeds the model's context length 1024"):
        mlxtral.load(path, backend="numpy", tokenizer=False, max_context=1025)
    for bad in (0, -5):
        with pytest.raises(UsageError, match="max_context must be >= 1"):
            mlxtral.load(path, backend="numpy", tokenizer=False, max_context=bad)
    assert mlxtral.load(path, backend="numpy", tokenizer=False, max_context=1024).max_context == 1024


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_gguf(tmp_path_factory.mktemp("ept") / "moe.gguf", seed=7)


EPT_IDS = [1, 330, 17, 499, 42, 7, 250, 3, 77, 8, 120, 301, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_per_token_override_through_load(moe_gguf: Path, backend: str) -> None:
    ids, L = EPT_IDS, 2
    base = mlxtral.load(moe_gguf, backend=backend, tokenizer=False)
    assert base.config.n_experts == 4 and base.config.n_experts_per_tok == 2
    ref = base.logits(ids)
    np.testing.assert_array_equal(base.expert_counts().sum(1), [len(ids) * 2] * L)
    for k in (1, 3, 4):
        m = mlxtral.load(moe_gguf, backend=backend, tokenizer=False, experts_per_token=k)
        assert m.config.n_experts_per_tok == k and m.checkpoint.args.n_experts_per_tok == k
        assert m.expert_counts().sum() == 0
        got = m.logits(ids)
        counts = m.expert_counts()
        assert counts.shape == (L, 4)
        np.testing.assert_array_equal(counts.sum(1), [len(ids) * k] * L)
        assert counts.max() <= len(ids)  # an expert at most once per token
        assert np.abs(got - ref).max() > 1e-2, k
        if backend == "mlx":  # the same override reaches both backends
            nm = mlxtral.load(moe_gguf, backend="numpy", tokenizer=False, experts_per_token=k)
            np.testing.assert_allclose(got, nm.logits(ids), atol=1e-3, rtol=0)
            np.testing.assert_array_equal(counts, nm.expert_counts())
    # the file's value given explicitly is the default
    same = mlxtral.load(moe_gguf, backend=backend, tokenizer=False, experts_per_token=2).logits(ids)
    np.testing.assert_array_equal(same, ref)


def test_experts_per_token_equals_the_naive_loop_with_k(moe_gguf: Path) -> None:
    """k = 1 and 3 through load() give the per-token, per-expert reference loop's outputs."""
    for k in (1, 3):
        m = mlxtral.load(moe_gguf, backend="numpy", tokenizer=False, experts_per_token=k)
        be = m.backend
        x = np.random.default_rng(k).standard_normal((9, m.config.dim)).astype(np.float32)
        for li in range(m.config.n_layers):
            np.testing.assert_allclose(be.moe(x, be.layers[li], li), be.moe_naive(x, li), atol=1e-4, rtol=0)


def test_experts_per_token_out_of_range_is_a_usage_error(moe_gguf: Path, tmp_path: Path) -> None:
    for k in (0, -1, 5):
        with pytest.raises(UsageError, match=r"\(--experts-per-token\) must be between 1 and 4"):
            mlxtral.load(moe_gguf, backend="numpy", tokenizer=False, experts_per_token=k)
    dense = _tiny_gguf(tmp_path / "dense.gguf", n_experts=0)
    with pytest.raises(UsageError, match="mixture-of-experts"):
        mlxtral.load(dense, backend="numpy", tokenizer=False, experts_per_token=1)


@pytest.mark.parametrize(("n_experts", "dtype", "shards"), [(4, "f32", 1), (4, "bf16", 3), (0, "f32", 1)])
def test_hf_folder_through_load_matches_transformers(tmp_path: Path, n_experts: int, dtype: str,
                                                     shards: int) -> None:
    """mlxtral.load on an HF folder vs transformers on the same folder: max abs 1e-3, same argmax."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    args = tm.tiny_args(n_experts=n_experts)
    folder = tm.write_hf(tmp_path / "hf", tm.random_weights(args, seed=21), args, dtype=dtype, shards=shards)
    model = mlxtral.load(folder, backend="numpy")
    assert model.config.n_experts == n_experts
    ids = model.encode("The capital of France is Paris, and the capital of Italy is Rome. 1 + 1 = 2")
    assert ids[0] == 1 and len(ids) > 20
    ours = model.logits(ids)
    ref = tm.hf_reference_logits(folder, ids)
    assert ours.shape == ref.shape == (len(ids), args.vocab_size)
    assert np.abs(ref).max() > 0.5  # a meaningful comparison, not all zeros
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
