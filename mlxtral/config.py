"""ModelArgs: the model's hyperparameters, built from whichever file the checkpoint carries.

One dataclass for Mixtral-shaped models (and dense ones: ``n_experts == 0``), built from GGUF
metadata, an HF ``config.json`` or an original ``params.json``. Unknown keys are ignored; a missing
required key is a :class:`ConfigError` naming the file and the key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlxtral.display import show
from mlxtral.errors import ConfigError, FormatError, UsageError


@dataclass
class ModelArgs:
    dim: int  # hidden size (4096 for Mixtral)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # expert (or dense FFN) intermediate size (14336)
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    n_experts: int = 0  # 0: a dense model (one always-on FFN)
    n_experts_per_tok: int = 0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope_dim: int | None = None  # None: the whole head
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v > 1 << 24:
                raise ConfigError(f"{name} must be a positive integer below 2**24, got {_show(v)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.n_experts < 0 or self.n_experts > 4096:
            raise ConfigError(f"n_experts must be between 0 and 4096, got {self.n_experts}")
        if self.n_experts:
            if not 1 <= self.n_experts_per_tok <= self.n_experts:
                raise ConfigError(
                    f"experts per token must be between 1 and {self.n_experts}, got {self.n_experts_per_tok}"
                )
        # what the forward pass cannot compute (files get the same checks, naming their keys, in _build)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs of values), got {self.head_dim}")
        if self.rope_dim is None:
            self.rope_dim = self.head_dim
        if (not isinstance(self.rope_dim, int) or self.rope_dim <= 0 or self.rope_dim % 2
                or self.rope_dim > self.head_dim):
            raise ConfigError(f"rope_dim must be even and at most the head size {self.head_dim}, "
                              f"got {_show(self.rope_dim)}")
        _float("norm_eps", self.norm_eps, None)
        _float("rope_theta", self.rope_theta, None, MIN_ROPE_THETA)

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_ffn(self) -> int:
        """Number of FFN blocks a layer stores (1 for a dense model)."""
        return max(self.n_experts, 1)

    @property
    def n_ffn_active(self) -> int:
        return self.n_experts_per_tok if self.is_moe else 1

    def with_experts_per_token(self, k: int | None) -> ModelArgs:
        """A copy using ``k`` experts per token (llama.cpp's ``--override-kv expert_used_count``)."""
        if k is None:
            return self
        if not self.is_moe:
            raise UsageError("experts_per_token only applies to a mixture-of-experts model")
        if not 1 <= k <= self.n_experts:
            raise UsageError(f"experts per token (--experts-per-token) must be between 1 and "
                             f"{self.n_experts}, got {k}")
        d = asdict(self)
        d["n_experts_per_tok"] = k
        return ModelArgs(**d)

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, embeddings and output included."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        router = self.n_experts * self.dim
        norms = 2 * self.dim
        per_layer_total = attn + ffn * self.n_ffn + router + norms
        per_layer_active = attn + ffn * self.n_ffn_active + router + norms
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_word_embeddings else emb
        total = self.n_layers * per_layer_total + emb + out + self.dim
        active = self.n_layers * per_layer_active + emb + out + self.dim
        return total, active

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        return 2 * self.n_layers * n_ctx * self.n_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---- builders ------------------------------------------------------------------------
    # Each builder only picks values out of its file, with the key as the file spells it; _build
    # validates every one of them (types, ranges, the relations between them) in one place.
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From a Hugging Face ``config.json`` (mixtral, mistral, llama)."""
        k = _Keys(cfg, path)
        theta = k.opt("rope_theta")
        if theta[1] is None:
            rp = cfg.get("rope_parameters")
            if isinstance(rp, dict) and rp.get("rope_theta") is not None:
                theta = ("rope_parameters.rope_theta", rp["rope_theta"])
        return _build(
            cls,
            path,
            {
                "dim": k.req("hidden_size"),
                "n_layers": k.req("num_hidden_layers"),
                "n_heads": k.req("num_attention_heads"),
                "n_kv_heads": k.opt("num_key_value_heads"),
                "head_dim": k.opt("head_dim"),
                "hidden_dim": k.req("intermediate_size"),
                "vocab_size": k.req("vocab_size"),
                "norm_eps": k.opt("rms_norm_eps"),
                "rope_theta": theta,
                "n_experts": k.opt("num_local_experts"),
                "n_experts_per_tok": k.opt("num_experts_per_tok"),
                "max_position_embeddings": k.opt("max_position_embeddings"),
                "tie_word_embeddings": k.opt("tie_word_embeddings"),
                "sliding_window": k.opt("sliding_window"),
                "model_type": k.opt("model_type"),
                "hidden_act": k.opt("hidden_act"),
                "rope_scaling": k.opt("rope_scaling"),
                "rope_parameters": k.opt("rope_parameters"),
            },
            rope_theta=1e6,
            max_position_embeddings=32768,
        )

    @classmethod
    def from_params_json(cls, p: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From Mistral's original ``params.json``. RoPE theta defaults to 1e6 (Mixtral)."""
        k = _Keys(p, path)
        moe = p.get("moe")
        if moe is None:
            moe = {}
        if not isinstance(moe, dict):
            raise ConfigError("'moe' must be an object", path)
        m = _Keys(moe, path, shown="moe.")
        ctx = k.opt("max_seq_len")
        if ctx[1] is None:
            ctx = k.opt("max_position_embeddings")
        return _build(
            cls,
            path,
            {
                "dim": k.req("dim"),
                "n_layers": k.req("n_layers"),
                "n_heads": k.req("n_heads"),
                "n_kv_heads": k.opt("n_kv_heads"),
                "head_dim": k.opt("head_dim"),
                "hidden_dim": k.req("hidden_dim"),
                "vocab_size": k.req("vocab_size"),
                "norm_eps": k.opt("norm_eps"),
                "rope_theta": k.opt("rope_theta"),
                "n_experts": m.opt("num_experts"),
                "n_experts_per_tok": m.opt("num_experts_per_tok"),
                "max_position_embeddings": ctx,
                "sliding_window": k.opt("sliding_window"),
                "rope_scaling": k.opt("rope_scaling"),
            },
            rope_theta=1e6,
            max_position_embeddings=32768,
        )

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From GGUF key/values (``{arch}.embedding_length`` ...), already decoded to Python values."""
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError("no general.architecture in the GGUF metadata", path)
        if arch not in ("llama", "mixtral", "mistral"):
            raise FormatError(f"unsupported architecture {_show(arch)} (mlxtral runs llama-family models)",
                              path)
        pre = arch + "."
        k = _Keys(md, path, prefix=pre)
        vocab = k.opt("vocab_size")
        if vocab[1] is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list):
                raise ConfigError(f"missing {pre}vocab_size and tokenizer.ggml.tokens", path)
            vocab = ("the number of tokenizer.ggml.tokens", len(tokens))
        return _build(
            cls,
            path,
            {
                "dim": k.req("embedding_length"),
                "n_layers": k.req("block_count"),
                "n_heads": k.req("attention.head_count"),
                "n_kv_heads": k.opt("attention.head_count_kv"),
                "head_dim": k.opt("attention.key_length"),
                "hidden_dim": k.req("feed_forward_length"),
                "vocab_size": vocab,
                "norm_eps": k.opt("attention.layer_norm_rms_epsilon"),
                "rope_theta": k.opt("rope.freq_base"),
                "n_experts": k.opt("expert_count"),
                "n_experts_per_tok": k.opt("expert_used_count"),
                "max_position_embeddings": k.opt("context_length"),
                "rope_dim": k.opt("rope.dimension_count"),
                "value_length": k.opt("attention.value_length"),
                "rope_scaling_type": k.opt("rope.scaling.type"),
                "rope_scaling_factor": k.opt("rope.scaling.factor"),
                "rope_scale_linear": k.opt("rope.scale_linear"),
            },
            rope_theta=10000.0,
            max_position_embeddings=4096,
        )
        # tie_word_embeddings stays False: the GGUF loader decides it (no output.weight tensor)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        data = read_json(path)
        if path.name == "params.json":
            return cls.from_params_json(data, path)
        return cls.from_hf_config(data, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (missing, unreadable, not JSON, nested too deep to
    parse, not an object) is a one-line :class:`ConfigError` naming the file."""
    from mlxtral.formats.files import read_side_json  # regular file, size cap, one-line errors

    data = read_side_json(path, ConfigError, unique_keys=True)  # a model defined once
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", path)
    return data


# ---- validation ----------------------------------------------------------------------------------
MAX_SIZE = 1 << 24  # any size (dim, layers, heads, vocabulary...): ModelArgs refuses more
MAX_EXPERTS = 4096
MAX_CONTEXT = 1 << 32  # only a ceiling for max_context; far beyond any model
MAX_FLOAT32 = 3.4028234663852886e38  # eps and RoPE theta reach float32 kernels
MIN_FLOAT32 = 1.1754943508222875e-38  # float32's smallest normal: a smaller eps underflows (x/0 in rms_norm)
MIN_ROPE_THETA = 1.0  # a RoPE base below 1 gives frequencies above 1 rad/position: angles overflow float32
# HF rope_scaling / rope_parameters types (and GGUF rope.scaling.type) that are plain RoPE
_PLAIN_ROPE = (None, "default", "none")
_SILU = (None, "silu", "swish")


class _Keys:
    """Values of ``d`` as ``(key as the file spells it, value)``; ``None`` when absent."""

    def __init__(self, d: dict[str, Any], path: str | Path | None, prefix: str = "", shown: str = "") -> None:
        self.d, self.path, self.prefix, self.shown = d, path, prefix, shown

    def req(self, key: str) -> tuple[str, Any]:
        name = self.prefix + key
        if name not in self.d:
            raise ConfigError(f"missing required key {self.shown + name!r}", self.path)
        v = self.d[name]
        if v is None:
            raise ConfigError(f"{self.shown + name} must not be null", self.path)
        return self.shown + name, v

    def opt(self, key: str) -> tuple[str, Any]:
        name = self.prefix + key
        return self.shown + name, self.d.get(name)


def _show(v: Any) -> str:
    """``repr(v)``, cut short before it is made (:func:`mlxtral.display.show`): a value from a hostile
    file can be a megabyte-long list or a 1e308-sized integer."""
    return show(v, 60)


def _int(key: str, v: Any, path: str | Path | None, lo: int = 1, hi: int = MAX_SIZE) -> int:
    """An integer in [lo, hi]; an integral float (64.0) is accepted, a bool or a string is not."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(lo, f"an integer >= {lo}")
        raise ConfigError(f"{key} must be {what}, got {_show(v)}", path)
    if v > hi:
        limit = "2**24" if hi == MAX_SIZE else str(hi)
        raise ConfigError(f"{key} must be at most {limit}, got {_show(v)}", path)
    return v


def _float(key: str, v: Any, path: str | Path | None, lo: float = MIN_FLOAT32) -> float:
    """A finite number > 0 that float32 can hold (at least ``lo``: by default float32's smallest
    normal number, since the kernels compute in float32 and a smaller value underflows to 0)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_FLOAT32:
        # NaN fails the comparison; inf and huge ints exceed MAX_FLOAT32
        raise ConfigError(f"{key} must be a positive finite number, got {_show(v)}", path)
    if v < lo:
        why = ("float32's smallest normal number: a smaller one underflows to 0 in the kernels"
               if lo == MIN_FLOAT32 else "RoPE's base: a smaller one overflows the rotation angles")
        raise ConfigError(f"{key} must be at least {lo:.3g} ({why}), got {_show(v)}", path)
    return float(v)


def _plain_rope(kind: Any, factor: Any) -> bool:
    """Whether a RoPE scaling type and factor compute plain RoPE (linear or dynamic scaling by 1, or by
    0, which llama.cpp writes for none)."""
    return kind in _PLAIN_ROPE or (kind in ("linear", "dynamic") and factor in (None, 0, 1))


def _check_rope_scaling(raw: dict[str, tuple[str, Any]], path: str | Path | None) -> None:
    """Only plain RoPE is computed: a scaled one (linear, dynamic NTK, YaRN, llama3, longrope) would
    run, silently wrong, so it is refused."""
    for name in ("rope_scaling", "rope_parameters"):  # HF (transformers 5: rope_parameters), params.json
        if name not in raw or raw[name][1] is None:
            continue
        key, v = raw[name]
        if not isinstance(v, dict):
            raise ConfigError(f"{key} must be an object or null, got {_show(v)}", path)
        kind = v.get("rope_type", v.get("type"))
        if not _plain_rope(kind, v.get("factor")):
            raise ConfigError(f"{key} type {_show(kind)} is not supported (mlxtral computes plain RoPE, "
                              "without linear, dynamic, YaRN, llama3 or longrope scaling)", path)
    if "rope_scaling_type" in raw:  # GGUF
        key, kind = raw["rope_scaling_type"]
        factor = raw["rope_scaling_factor"][1]
        if not _plain_rope(kind, factor):
            raise ConfigError(f"{key} {_show(kind)} with factor {_show(factor)} is not supported (mlxtral "
                              "computes plain RoPE)", path)
        key, lin = raw["rope_scale_linear"]
        if lin not in (None, 1):
            raise ConfigError(f"{key} {_show(lin)} is not supported (mlxtral computes plain RoPE)", path)


def _build(cls: type[ModelArgs], path: str | Path | None, raw: dict[str, tuple[str, Any]],
           **defaults: Any) -> ModelArgs:
    """ModelArgs from ``raw`` ({field: (key as the file spells it, value or None)}): every value is
    checked here, once, for every format, so that a bad file is a one-line ConfigError naming the file
    and the key, never a TypeError or a ZeroDivisionError further on. A value of ``None`` (absent or
    null) takes its default; ``defaults`` gives the format's ``rope_theta`` and
    ``max_position_embeddings``."""
    def key(name: str) -> str:
        return raw[name][0]

    def val(name: str) -> Any:
        return raw[name][1] if name in raw else None

    def size(name: str, default: Any = None, lo: int = 1, hi: int = MAX_SIZE) -> Any:
        v = val(name)
        return default if v is None else _int(key(name), v, path, lo, hi)

    kw: dict[str, Any] = {}
    for name in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"):
        kw[name] = size(name)
    dim, n_heads = kw["dim"], kw["n_heads"]
    head_dim = size("head_dim")
    if head_dim is None:
        if dim % n_heads:
            raise ConfigError(f"{key('dim')} ({dim}) must be a multiple of {key('n_heads')} ({n_heads})",
                              path)
        head_dim = dim // n_heads
    if head_dim % 2:  # RoPE rotates pairs of values: an odd head has a value left over
        what = (key("head_dim") if val("head_dim") is not None
                else f"the head size {key('dim')} / {key('n_heads')}")
        raise ConfigError(f"{what} must be even (RoPE rotates pairs of values), got {head_dim}", path)
    kw["head_dim"] = head_dim
    vlen = size("value_length")
    if vlen is not None and vlen != head_dim:
        raise ConfigError(f"{key('value_length')} ({vlen}) must equal the key head size {head_dim}", path)
    n_kv = kw["n_kv_heads"] = size("n_kv_heads", n_heads)
    if n_heads % n_kv:
        kv_key = key("n_kv_heads") if val("n_kv_heads") is not None else "the number of KV heads"
        raise ConfigError(f"{key('n_heads')} ({n_heads}) must be a multiple of {kv_key} ({n_kv})", path)

    n_experts = kw["n_experts"] = size("n_experts", 0, lo=0, hi=MAX_EXPERTS)
    per_tok = kw["n_experts_per_tok"] = size("n_experts_per_tok", 2 if n_experts else 0, lo=0, hi=MAX_EXPERTS)
    if n_experts and not 1 <= per_tok <= n_experts:
        per_key = key("n_experts_per_tok") if val("n_experts_per_tok") is not None else "experts per token"
        raise ConfigError(f"{per_key} must be between 1 and {key('n_experts')} ({n_experts}), got {per_tok}",
                          path)

    for name, default, lo in (("norm_eps", 1e-5, MIN_FLOAT32),
                              ("rope_theta", defaults["rope_theta"], MIN_ROPE_THETA)):
        v = val(name)
        kw[name] = default if v is None else _float(key(name), v, path, lo)
    _check_rope_scaling(raw, path)
    kw["max_position_embeddings"] = size("max_position_embeddings", defaults["max_position_embeddings"],
                                         hi=MAX_CONTEXT)
    rope_dim = size("rope_dim")
    if rope_dim is not None and (rope_dim % 2 or rope_dim > head_dim):
        raise ConfigError(f"{key('rope_dim')} must be even and at most the head size {head_dim}, "
                          f"got {rope_dim}", path)
    kw["rope_dim"] = rope_dim

    sw = val("sliding_window")
    if isinstance(sw, list):
        sw = None  # per-layer windows (newer params.json): not supported, ignored as before
    kw["sliding_window"] = size("sliding_window", hi=MAX_CONTEXT) if sw is not None else None

    tie = val("tie_word_embeddings")
    if tie not in (None, True, False):  # 0 and 1 compare equal to False and True
        raise ConfigError(f"{key('tie_word_embeddings')} must be true or false, got {_show(tie)}", path)
    kw["tie_word_embeddings"] = bool(tie)

    if "model_type" in raw:
        mt = val("model_type")
        if mt is not None and not isinstance(mt, str):
            raise ConfigError(f"{key('model_type')} must be a string, got {_show(mt)}", path)
        kw["extra"] = {"model_type": mt}
    act = val("hidden_act")
    if act not in _SILU:  # the experts are SiLU-gated; GELU (Gemma) would run, silently wrong
        raise ConfigError(f"{key('hidden_act')} {_show(act)} is not supported (mlxtral computes "
                          "SiLU-gated FFNs)", path)
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(e.message, path) from None
