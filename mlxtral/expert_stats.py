"""Per-layer expert load as a rich heatmap: which experts the router picked, layer by layer.

``counts`` is ``[n_layers, n_experts]`` (tokens routed to each expert, from
``Model.expert_counts()``). Each cell shows the expert's share of its layer's routed tokens; the
colour is that share relative to a perfectly balanced layer (1/E), blue for under-used, red for
over-used. The last column is the layer's balance: normalized routing entropy, 100% = uniform.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mlxtral.wording import plural


def shares(counts: np.ndarray) -> np.ndarray:
    """[L, E] counts -> [L, E] fractions of each layer's routed tokens (0 where nothing routed)."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def balance(counts: np.ndarray) -> np.ndarray:
    """[L] normalized entropy of each layer's expert load, in [0, 1] (1 = perfectly balanced)."""
    p = shares(counts)
    E = p.shape[1]
    if E < 2:
        return np.ones(p.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / np.log(E)


def _colour(ratio: float) -> str:
    """Background colour for a share ``ratio`` times the balanced share."""
    if ratio <= 0:
        return "grey15"
    # 0.0 .. 1 .. 2+: blue .. neutral .. red
    steps = ["navy_blue", "dark_blue", "blue3", "dodger_blue3", "grey35",
             "dark_orange3", "orange_red1", "red3", "red1"]
    x = min(max(ratio, 0.0), 2.0) / 2.0
    return steps[min(int(x * (len(steps) - 1) + 0.5), len(steps) - 1)]


def heatmap(counts: np.ndarray, title: str = "expert load per layer") -> Any:
    """A ``rich.table.Table``: rows are layers, columns experts, cells each expert's share."""
    from rich.table import Table
    from rich.text import Text

    c = np.asarray(counts)
    L, E = c.shape
    p = shares(c)
    bal = balance(c)
    total = int(c.sum())
    t = Table(title=title, caption=f"{plural(total, 'routed (token, expert) pair')}; colour = share vs 1/{E} "
              "(blue under, red over); bal. = routing entropy / log E",
              show_lines=False, pad_edge=False)
    t.add_column("layer", justify="right", style="bold")
    for e in range(E):
        t.add_column(f"e{e}", justify="right", no_wrap=True)
    t.add_column("bal.", justify="right", no_wrap=True)
    for li in range(L):
        cells = []
        for e in range(E):
            ratio = p[li, e] * E
            cells.append(Text(f"{100 * p[li, e]:3.0f}%", style=f"white on {_colour(ratio)}"))
        t.add_row(str(li), *cells, f"{100 * bal[li]:.0f}%")
    return t


def as_dict(counts: np.ndarray) -> dict[str, Any]:
    c = np.asarray(counts)
    return {"counts": c.astype(int).tolist(), "balance": [round(float(b), 4) for b in balance(c)]}


def cache_table(c: dict[str, Any]) -> Any:
    """The expert cache's figures (:meth:`mlxtral.Model.expert_cache_stats`) as a rich table."""
    from rich.table import Table

    t = Table(title="expert cache (experts streamed from disk)", title_justify="left", show_header=False)
    t.add_column("", justify="left")
    t.add_column("", justify="right")
    rows = [
        ("slots", f"{c['cache_slots']} x {c['slot_bytes'] / 1e6:.0f} MB ({c['policy']}, "
                  f"{'O_DIRECT' if c['direct_io'] else 'buffered'} reads)"),
        ("hit rate", f"{c['hit_rate']:.1%} of {plural(c['requests'], 'expert use')}"),
        ("prefetch accuracy", f"{c['prefetch_accuracy']:.1%} of {c['prefetched']} read ahead"
                              if c["prefetch"] else "off"),
        ("read from disk", f"{c['bytes_read'] / 1e9:.2f} GB, "
                           f"{c['bytes_read_per_token'] / 1e6:.0f} MB per token"),
        ("waiting on disk", f"{c['io_wait_seconds']:.2f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
