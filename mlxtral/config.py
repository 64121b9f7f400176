"""ModelArgs: the model's hyperparameters, built from whichever file the checkpoint carries.

One dataclass for Mixtral-shaped models (and dense ones: ``n_experts == 0``), built from GGUF
metadata, an HF ``config.json`` or an original ``params.json``. Unknown keys are ignored; a missing
required key is a :class:`ConfigError` naming the file and the key.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
                raise ConfigError(f"{name} must be a positive integer below 2**24, got {v!r}")
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
        if self.rope_dim is None:
            self.rope_dim = self.head_dim

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
            raise UsageError(f"experts_per_token must be between 1 and {self.n_experts}, got {k}")
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
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From a Hugging Face ``config.json`` (mixtral, mistral, llama)."""
        req = _required(cfg, path)
        dim = req("hidden_size")
        n_heads = req("num_attention_heads")
        head_dim = cfg.get("head_dim") or dim // n_heads
        theta = cfg.get("rope_theta")
        if theta is None:
            rp = cfg.get("rope_parameters") or {}
            theta = rp.get("rope_theta") if isinstance(rp, dict) else None
        n_experts = int(cfg.get("num_local_experts") or 0)
        return _build(
            cls,
            path,
            dim=dim,
            n_layers=req("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            hidden_dim=req("intermediate_size"),
            vocab_size=req("vocab_size"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta if theta is not None else 1e6),
            n_experts=n_experts,
            n_experts_per_tok=int(cfg.get("num_experts_per_tok") or (2 if n_experts else 0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window"),
            extra={"model_type": cfg.get("model_type")},
        )

    @classmethod
    def from_params_json(cls, p: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From Mistral's original ``params.json``. RoPE theta defaults to 1e6 (Mixtral)."""
        req = _required(p, path)
        dim = req("dim")
        n_heads = req("n_heads")
        moe = p.get("moe") or {}
        if not isinstance(moe, dict):
            raise ConfigError("'moe' must be an object", path)
        n_experts = int(moe.get("num_experts") or 0)
        return _build(
            cls,
            path,
            dim=dim,
            n_layers=req("n_layers"),
            n_heads=n_heads,
            n_kv_heads=p.get("n_kv_heads") or n_heads,
            head_dim=p.get("head_dim") or dim // n_heads,
            hidden_dim=req("hidden_dim"),
            vocab_size=req("vocab_size"),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 1e6)),
            n_experts=n_experts,
            n_experts_per_tok=int(moe.get("num_experts_per_tok") or (2 if n_experts else 0)),
            max_position_embeddings=int(p.get("max_seq_len") or p.get("max_position_embeddings") or 32768),
            tie_word_embeddings=False,
            sliding_window=p.get("sliding_window"),
        )

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], path: str | Path | None = None) -> ModelArgs:
        """From GGUF key/values (``{arch}.embedding_length`` ...), already decoded to Python values."""
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError("no general.architecture in the GGUF metadata", path)
        if arch not in ("llama", "mixtral", "mistral"):
            raise FormatError(f"unsupported architecture {arch!r} (mlxtral runs llama-family models)", path)
        pre = arch + "."
        req = _required(md, path, prefix=pre)
        dim = req("embedding_length")
        n_heads = req("attention.head_count")
        head_dim = md.get(pre + "attention.key_length") or dim // n_heads
        n_experts = int(md.get(pre + "expert_count") or 0)
        vocab = md.get(pre + "vocab_size")
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) else None
        if vocab is None:
            raise ConfigError(f"missing {pre}vocab_size and tokenizer.ggml.tokens", path)
        return _build(
            cls,
            path,
            dim=dim,
            n_layers=req("block_count"),
            n_heads=n_heads,
            n_kv_heads=md.get(pre + "attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            hidden_dim=req("feed_forward_length"),
            vocab_size=vocab,
            norm_eps=float(md.get(pre + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(md.get(pre + "rope.freq_base", 10000.0)),
            n_experts=n_experts,
            n_experts_per_tok=int(md.get(pre + "expert_used_count") or (2 if n_experts else 0)),
            max_position_embeddings=int(md.get(pre + "context_length") or 4096),
            tie_word_embeddings=False,  # decided by the loader: no output.weight tensor
            rope_dim=md.get(pre + "rope.dimension_count"),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        data = read_json(path)
        if path.name == "params.json":
            return cls.from_params_json(data, path)
        return cls.from_hf_config(data, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid JSON ({e})", path) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", path)
    return data


def _required(d: dict[str, Any], path: str | Path | None, prefix: str = ""):
    def get(key: str) -> Any:
        if prefix + key not in d:
            raise ConfigError(f"missing required key {prefix + key!r}", path)
        return d[prefix + key]

    return get


def _build(cls: type[ModelArgs], path: str | Path | None, **kw: Any) -> ModelArgs:
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "rope_dim"):
        v = kw.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise ConfigError(f"{k} must be an integer, got {v!r}", path)
        kw[k] = int(v)
    sw = kw.get("sliding_window")
    if sw is not None and not isinstance(sw, int):
        kw["sliding_window"] = None
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(e.message, path) from None
