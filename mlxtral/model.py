"""The Python API: ``mlxtral.load(path)`` -> :class:`Model` with tokenize, logits, generate, stream."""
from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import ContextLengthError, MlxtralError, UsageError
from mlxtral.formats import Checkpoint
from mlxtral.generate import GenerationResponse, Session, stream_generate
from mlxtral.sampling import SamplingParams
from mlxtral.wording import plural

Messages = list[dict[str, str]]
BACKENDS = ("auto", "numpy", "mlx")
DEFAULT_MAX_CONTEXT = 4096


def metal_available() -> bool:
    """True on Apple Silicon with a working MLX Metal device."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return False
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except Exception:
        return False


def resolve_backend(backend: str) -> str:
    """numpy or mlx; ``auto`` is ``MLXTRAL_BACKEND`` when set (auto, numpy or mlx), else MLX where
    Metal is available, else NumPy."""
    from mlxtral.display import show
    from mlxtral.env import env_choice

    backend = (backend or "auto").lower() if isinstance(backend, str) else backend
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {show(backend, 40)}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        env = env_choice("MLXTRAL_BACKEND", BACKENDS)
        if env is not None and env != "auto":
            return env
        return "mlx" if metal_available() else "numpy"
    return backend


class Model:
    """A loaded model: ``config``, ``tokenizer``, and generation on one backend."""

    def __init__(self, checkpoint: Checkpoint, backend: Any, tokenizer: Any, max_context: int) -> None:
        self.checkpoint = checkpoint
        self.config: ModelArgs = checkpoint.args
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._session: Session | None = None
        self.memory_plan: Any = None  # set by load(): resident or streaming, with the numbers

    def __repr__(self) -> str:
        c = self.config
        kind = f"{c.n_experts}x{c.n_experts_per_tok} MoE" if c.is_moe else "dense"
        return (f"<mlxtral.Model {self.checkpoint.path.name}: {self.checkpoint.format}, {kind}, "
                f"{plural(c.n_layers, 'layer')}, dim {c.dim}, backend {self.backend.name}>")

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def dtype(self) -> str:
        """The compute dtype: "float32" on NumPy; MLX's float16, bfloat16 or float32."""
        dt = getattr(self.backend, "dtype", None)
        return "float32" if dt is None else str(dt).removeprefix("mlx.core.")

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template_name", None)

    # ---- tokens and logits ---------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos if bos is None else bos)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """One full forward over ``ids`` from an empty cache: float32 ``[len(ids), vocab]``."""
        not_ids = UsageError("logits() takes a list of token ids (model.encode(text) makes them from text)")
        if isinstance(ids, (str, bytes)):
            raise not_ids
        try:
            ids = list(ids)
        except TypeError:
            raise not_ids from None
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise not_ids
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("logits() needs at least one token")
        self._check_ids(ids)
        cache = self.backend.new_cache(max(len(ids), 1))
        return np.asarray(self.backend.forward(ids, cache, all_logits=True), dtype=np.float32)

    # ---- quality ---------------------------------------------------------------------------
    def perplexity(self, text: str | Sequence[int], ctx: int = 512, chunks: int | None = None,
                   progress: Any = None, kl_base: str | os.PathLike[str] | None = None) -> Any:
        """Perplexity over ``text`` with llama-perplexity's protocol (chunks of ``ctx`` from an empty
        cache, BOS first where the vocabulary adds it, second halves scored): a
        :class:`~mlxtral.evaluation.PerplexityResult` (``ppl``, ``ppl_stderr``, ``chunks``,
        ``tokens_scored``, ``nll_per_chunk``...). ``kl_base``: also save the log-probabilities there
        (llama.cpp's ``--kl-divergence-base`` format). ``progress(done, total, running_ppl)``."""
        from mlxtral.evaluation.perplexity import perplexity

        return perplexity(self, text, ctx=ctx, chunks=chunks, progress=progress, kl_base=kl_base)

    def kl_divergence(self, base: str | os.PathLike[str], text: str | Sequence[int] | None = None,
                      chunks: int | None = None, progress: Any = None) -> Any:
        """KL divergence of this model from the reference saved in ``base`` (by ``perplexity(...,
        kl_base=...)`` or llama-perplexity): a :class:`~mlxtral.evaluation.KLDResult`."""
        from mlxtral.evaluation.kld import kl_divergence

        return kl_divergence(self, base, text, chunks=chunks, progress=progress)

    def _check_ids(self, ids: Sequence[int]) -> None:
        v = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{v - 1})")

    # ---- chat ----------------------------------------------------------------------------
    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        from mlxtral.tokenizer.chat import apply_chat_template

        return apply_chat_template(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, prompt: str | Messages | Sequence[int], chat: bool | None = None) -> list[int]:
        """Token ids for a string (raw, or chat-templated when ``chat``), messages, or ids."""
        if isinstance(prompt, str):
            if chat:
                return self.apply_chat_template([{"role": "user", "content": prompt}])
            return self.encode(prompt)
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt)  # type: ignore[arg-type]
        if prompt and not all(isinstance(i, (int, np.integer)) for i in prompt):
            raise UsageError("a prompt is a string, a list of messages, or a list of token ids")
        ids = [int(i) for i in prompt]
        self._check_ids(ids)
        return ids

    # ---- generation ----------------------------------------------------------------------
    def new_session(self, max_context: int | None = None) -> Session:
        return Session(self.backend.new_cache(max_context or self.max_context))

    def stream(
        self,
        prompt: str | Messages | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        chat: bool | None = None,
        session: Session | None = None,
        prefill_chunk: int = 512,
    ) -> Iterator[GenerationResponse]:
        """Yield responses as tokens come: ``r.text`` (new text), ``r.token``; the last has ``r.stats``.

        ``chat``: a string prompt is put in the chat template; ids are a chat template's (the answer
        is text of its own, without a SentencePiece vocabulary's leading space). A raw prompt's
        text continues it, as a completion: " Paris" after "The capital of France is".

        Without ``session`` the model's own session is used, so a prompt that extends the previous
        one (a chat) reuses its KV cache.
        """
        if not isinstance(prompt, str):
            prompt = list(prompt)  # read once (an iterator too)
        ids = self.prompt_ids(prompt, chat)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed=seed)
        if session is None:
            if self._session is None:
                self._session = self.new_session()
            session = self._session
        if isinstance(stop, str):
            stop = [stop]
        yield from stream_generate(
            self.backend, self.tokenizer, ids, session, max_tokens=max_tokens, sampling=params,
            stop=stop, prefill_chunk=prefill_chunk, continues=not self._is_chat(prompt, chat),
        )

    @staticmethod
    def _is_chat(prompt: str | Messages | Sequence[int], chat: bool | None) -> bool:
        """Whether ``prompt`` is a chat (messages, a string with ``chat``, ids of a chat template
        with ``chat``): its answer is text of its own; otherwise the text continues the prompt's (as
        it does a conversation ending with an assistant message: a prefill)."""
        if len(prompt) > 0 and isinstance(prompt[0], dict):
            return prompt[-1].get("role") != "assistant"  # type: ignore[index,union-attr]
        return bool(chat)

    def generate(self, prompt: str | Messages | Sequence[int], max_tokens: int = 256, **kw: Any) -> str:
        """The whole answer as a string (see :meth:`stream` for the arguments)."""
        parts = []
        for r in self.stream(prompt, max_tokens=max_tokens, **kw):
            parts.append(r.text)
            if r.stats is not None:
                self.last_stats = r.stats
        return "".join(parts)

    def close(self) -> None:
        """Stop the expert cache's threads and free its slots (when experts stream); the model
        is not used after this. Also what ``with mlxtral.load(...) as model:`` does at the end."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def streaming(self) -> bool:
        """True when the experts stream from the file through an expert cache."""
        return getattr(self.backend, "experts", None) is not None

    def expert_cache_stats(self) -> dict[str, Any] | None:
        """Hit rate, prefetch accuracy and disk traffic of the expert cache; None when resident."""
        cache = getattr(self.backend, "experts", None)
        if cache is None:
            return None
        d = cache.snapshot().as_dict()
        d.update(cache_slots=cache.capacity, slot_bytes=cache.slot_bytes, direct_io=cache.reader.direct,
                 policy=cache.policy, prefetch=cache.prefetch_enabled)
        return d

    def expert_counts(self) -> np.ndarray | None:
        """Tokens routed to each expert so far, ``[n_layers, n_experts]``."""
        c = getattr(self.backend, "expert_counts", None)
        return None if c is None else np.asarray(c)


def load(
    path: str | os.PathLike[str],
    backend: str = "auto",
    max_context: int | None = None,
    experts_per_token: int | None = None,
    kv_dtype: str | None = None,
    tokenizer: bool = True,
    check_memory: bool = True,
    dtype: str | None = None,
    memory_budget: int | str | None = None,
    prefetch: bool = True,
    eviction: str = "lfu",
    stream_experts: bool | None = None,
    distributed: str | None = None,
    logits_rows: int = 1,
) -> Model:
    """Load a GGUF file, an HF folder, a Mistral original folder, or an MLX folder; ``"demo"`` (when
    no such file or folder exists here) is the built-in demo model, built once into the cache.

    ``dtype``: the MLX backend's compute dtype ("float16", "bfloat16", "float32"; default float16
    on Metal, float32 on MLX's CPU backend, whose gather ops are float32-only); its KV cache uses
    the same. ``kv_dtype`` sets the NumPy backend's KV cache ("float32" or "float16"; it computes in
    float32) and, when ``dtype`` is not given, the MLX dtype.

    ``memory_budget``: bytes (or "12GB", "150MB") the run may use; default the memory available.
    ``logits_rows``: the positions whose logits one forward will return (1 for generation; a
    perplexity run's whole chunk), counted in the working set the budget must hold.
    If the whole model fits it is loaded; otherwise the experts stream from the file through an
    expert cache that fills the rest of the budget (``prefetch``: read the next layer's likely
    experts ahead; ``eviction``: "lfu" or "lru"), and ``model.memory_plan`` says so. Only when the
    non-expert weights, KV cache, working set and one token's experts do not fit is
    :class:`~mlxtral.errors.OutOfMemoryError` raised, with the numbers.

    ``stream_experts``: None decides as above; True streams a MoE model's experts even if it fits
    (the cache still fills the budget); False never streams (a model that does not fit is refused).

    ``check_memory=False`` skips the decision (and the check) and loads everything, as before.

    ``distributed``: "expert", "expert-rows" or "pipeline" in a process started by ``mlx.launch`` (see
    :mod:`mlxtral.distributed`): this rank loads its share only. On rank 0 the model works as usual
    (every forward is computed by the whole group); on every other rank ``load`` does not return:
    the process follows rank 0's forwards and exits when rank 0 closes its model or ends.
    """
    from mlxtral.formats.detect import open_checkpoint

    name = resolve_backend(backend)
    if str(path) == "demo" and not os.path.lexists(path):  # as on the command line: the built-in demo
        from mlxtral.demo import ensure_demo_model

        path = ensure_demo_model()
    ckpt = open_checkpoint(Path(path))
    ckpt.args = ckpt.args.with_experts_per_token(experts_per_token)
    model_ctx = ckpt.args.max_position_embeddings
    if max_context is None:
        max_context = min(model_ctx, DEFAULT_MAX_CONTEXT)
    if max_context < 1:
        raise UsageError(f"max_context must be >= 1, got {max_context}")
    if max_context > model_ctx:
        raise ContextLengthError(max_context, model_ctx)
    group = share = layout = whole_info = whole = None
    if distributed is not None:
        from mlxtral.distributed.setup import join
        from mlxtral.expert_cache.layout import expert_layout

        if stream_experts and name != "numpy":
            raise UsageError("--distributed streams experts on the NumPy backend only")
        settings = dict(backend=name, max_context=max_context, kv_dtype=kv_dtype, dtype=dtype,
                        experts_per_token=ckpt.args.n_experts_per_tok)
        group, share = join(ckpt, distributed, settings)
        whole, args = ckpt.tensors, ckpt.args  # the filter below makes a new dict: this one stays whole
        whole_info = {n: q.info() for n, q in whole.items()}  # the whole file, for figures per token
        mine = {n: share.share(n, q) for n, q in whole.items() if share.holds(n)}  # views of this rank's part
        # the experts this rank streams: its rows of every expert, or (whole experts) read off the
        # whole file's layout, which its own experts' spans are part of
        streamed = mine if share.sliced else whole
        layout = functools.cache(lambda: expert_layout(args, streamed, ckpt.path))
        ckpt.tensors = mine  # type: ignore[assignment]
        if name != "numpy":
            stream_experts = False
        tokenizer = tokenizer and share.head  # only rank 0 tokenizes
    from mlxtral.display import show

    if dtype is not None:  # refused before any weight is read
        from mlxtral.backends import mlx_dtype_name

        key = mlx_dtype_name(dtype)
        if name == "numpy" and key != "float32":
            raise UsageError(f"the NumPy backend computes in float32: dtype {key} is for the MLX backend "
                             "(--backend mlx)")
    if kv_dtype is not None and not isinstance(kv_dtype, str):  # np.float16, np.dtype("float16")...
        try:
            kv_dtype = np.dtype(kv_dtype).name
        except TypeError:
            pass
    if name == "numpy" and kv_dtype not in (None, "float32", "float16"):
        raise UsageError(f"kv_dtype {show(kv_dtype)}: the NumPy backend's KV cache is float32 or float16")
    if name == "mlx" and dtype is not None:
        kv_dtype = dtype
    from mlxtral.expert_cache import POLICIES, plan_memory

    if eviction not in POLICIES:
        raise UsageError(f"unknown eviction policy {eviction!r}: choose one of {', '.join(POLICIES)}")
    tok = None
    if tokenizer:  # before the weights are read: a tokenizer that does not fit is refused at once
        if ckpt.tokenizer is None:
            raise MlxtralError("no tokenizer found beside the weights", ckpt.path)
        from mlxtral.tokenizer import check_tokenizer_fits, load_tokenizer

        tok = load_tokenizer(ckpt.tokenizer)
        check_tokenizer_fits(tok, ckpt.args.vocab_size, ckpt.path)
        ckpt.drop_vocabulary()  # the tokenizer holds it now: not twice (~4 MB for 32k pieces)
    plan = None
    if check_memory or memory_budget is not None or stream_experts:
        plan = plan_memory(ckpt, name, max_context, kv_dtype, memory_budget, layout=layout,
                           stream=stream_experts, logits_rows=logits_rows)
    if share is not None and name == "numpy":  # by rows on 2 ranks: halves of the FFN width?
        from mlxtral.distributed.setup import half_tensors, halve

        assert group is not None and whole is not None
        share = halve(group, share, whole, plan is not None and plan.streaming)
        if share.halves:
            ckpt.tensors = half_tensors(share, whole)  # type: ignore[assignment]
    if plan is not None and plan.streaming:
        be = _streaming_backend(ckpt, name, plan, kv_dtype, prefetch, eviction, layout, share, group)
    elif name == "numpy":
        from mlxtral.backends.numpy_backend import NumpyBackend
        from mlxtral.formats.native import native_tensors

        ckpt.tensors = native_tensors(ckpt.tensors, ckpt.path)  # type: ignore[assignment]
        be = NumpyBackend(ckpt.args, ckpt.tensors, kv_dtype=kv_dtype or "float32", place=share, group=group)
    else:
        try:
            from mlxtral.backends.mlx_backend import MLXBackend
        except ImportError as e:
            raise MlxtralError(f"the MLX backend is not available ({e})") from None
        be = MLXBackend(ckpt.args, ckpt.tensors, dtype=kv_dtype, place=share, group=group)
        # MLX holds its own (repacked) copies: drop ours (views of the file, or arrays read into RAM
        # from a .pth), so nothing stays resident twice
        ckpt.tensors = {n: q.info() for n, q in ckpt.tensors.items()}  # type: ignore[misc]
    if group is not None and share is not None:
        from mlxtral.distributed.runner import follow, leader

        # every rank's decode step is already loaded (NumpyBackend warms it), not at the first token
        group.barrier("the start-up", wait=False)  # every rank loaded (a dead one: one line)
        if not share.head:
            follow(be, group, share)  # never returns
        be = leader(be, group, share)
        ckpt.tensors = whole_info  # type: ignore[assignment]
    model = Model(ckpt, be, tok, max_context)
    model.memory_plan = plan
    return model


def _streaming_backend(ckpt: Checkpoint, name: str, plan: Any, kv_dtype: str | None, prefetch: bool,
                       eviction: str, whole_layout: Any = None, share: Any = None, group: Any = None) -> Any:
    """A backend whose experts stream through an expert cache of ``plan.cache_slots`` slots; the
    other weights are read into this process's memory (not left as file pages). A rank of a group
    streams its own experts only (``whole_layout()``: the whole file's layout)."""
    from mlxtral.expert_cache import ExpertCache, expert_layout, is_expert
    from mlxtral.expert_cache.reader import read_copy
    from mlxtral.qtensor import QTensor

    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path) if whole_layout is None else whole_layout()
    experts = {n: q for n, q in ckpt.tensors.items() if is_expert(n)}
    k = ckpt.args.n_experts_per_tok
    # slots outside LFU's protected set: one layer's experts in use and the next one's read ahead
    reserve = 2 * (ckpt.args.n_experts if name == "mlx" else k) + 2
    rest = {n: QTensor(q.qtype, tuple(q.shape), read_copy(q.data)) if isinstance(q, QTensor) else q
            for n, q in ckpt.tensors.items() if not is_expert(n)}
    if name == "numpy":
        from mlxtral.backends.numpy_backend import NumpyBackend, expert_materializer

        cache = ExpertCache(layout, plan.cache_slots, expert_materializer(experts, ckpt.path),
                            prefetch=prefetch, policy=eviction, reserve=reserve)
        be: Any = NumpyBackend(ckpt.args, rest, kv_dtype=kv_dtype or "float32", experts=cache, place=share,
                               group=group)
    else:
        try:
            from mlxtral.backends.mlx_backend import MLXBackend
            from mlxtral.backends.mlx_backend import expert_materializer as mlx_materializer
        except ImportError as e:
            raise MlxtralError(f"the MLX backend is not available ({e})") from None
        cache = ExpertCache(layout, plan.cache_slots, mlx_materializer(experts, kv_dtype),
                            prefetch=prefetch, policy=eviction, reserve=reserve)
        be = MLXBackend(ckpt.args, rest, dtype=kv_dtype, experts=cache)
    # keep only type, shape and size of what the backend now holds or reads itself
    ckpt.tensors = {n: q.info() for n, q in ckpt.tensors.items()}  # type: ignore[misc]
    return be
