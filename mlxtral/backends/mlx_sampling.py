"""On-device sampling for pipelined MLX decoding: the chain of :mod:`mlxtral.sampling`
(top-k -> top-p -> min-p -> temperature -> draw, greedy at temperature 0) as one compiled MLX
function, so the sampled token never leaves the device between decode steps.

The draw uses MLX's random generator (keyed from ``seed``), so for ``temperature > 0`` the
tokens differ from the NumPy sampler's for the same seed; greedy decoding is identical.
The repetition penalty needs the token history on the host: it is not handled here (the
generation loop keeps the host sampler when it is on).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx

from mlxtral.sampling import SamplingParams


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """float32 logits [B, vocab] -> token ids [B] (uint32), lazily, on the device."""
    if params.repetition_penalty != 1.0:
        raise ValueError("the on-device sampler has no repetition penalty; sample on the host")
    if params.temperature == 0.0:
        return _argmax
    temp, top_k, top_p, min_p = params.temperature, params.top_k, params.top_p, params.min_p

    @mx.compile
    def draw(logits: mx.array, key: mx.array) -> mx.array:
        V = logits.shape[-1]
        order = mx.argsort(-logits, axis=-1)  # [B, V] descending
        sl = mx.take_along_axis(logits, order, axis=-1)
        keep = mx.ones(sl.shape, dtype=mx.bool_)
        if 0 < top_k < V:
            keep = keep & (mx.arange(V) < top_k)
        if top_p < 1.0:
            p = mx.softmax(mx.where(keep, sl, -mx.inf), axis=-1, precise=True)
            keep = keep & ((mx.cumsum(p, axis=-1) - p) < top_p)  # up to the first reaching top_p
        if min_p > 0.0:
            keep = keep & (mx.exp(sl - sl[:, :1]) >= min_p)
        z = mx.where(keep, sl / temp, -mx.inf)
        i = mx.random.categorical(z, axis=-1, key=key)  # [B] position in sorted order
        return mx.take_along_axis(order, i[:, None], axis=-1)[:, 0].astype(mx.uint32)

    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = [mx.random.key(seed)]

    def sample(logits: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        return draw(logits.astype(mx.float32), sub)

    return sample


@mx.compile
def _argmax(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1).astype(mx.uint32)
