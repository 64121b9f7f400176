"""What ``mlxtral perplexity`` shows: a rich progress bar with the running estimate while it works,
then rich tables (per chunk and overall), or one JSON object."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from mlxtral.evaluation.kld import KLDResult
from mlxtral.evaluation.perplexity import PerplexityResult, Progress

MAX_CHUNK_ROWS = 64  # longer runs show the first and last chunks, the JSON has them all


@contextmanager
def progress_bar(console: Console, label: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress bar over chunks whose text shows the running PPL; yields the callback."""
    if not enabled:
        yield None
        return
    from rich import progress as rp

    cols = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
            rp.TextColumn("chunks"), rp.TextColumn("[bold]{task.fields[ppl]}"), rp.TimeElapsedColumn(),
            rp.TimeRemainingColumn())
    prog = rp.Progress(*cols, console=console, transient=True)
    task = prog.add_task(label, total=None, ppl="")

    def update(done: int, total: int, ppl: float) -> None:
        if not prog.live.is_started:  # shown once the work starts: a refusal before it prints one line
            prog.start()
        prog.update(task, completed=done, total=total, ppl=f"PPL {ppl:.4f}" if done else "")

    try:
        yield update
    finally:
        if prog.live.is_started:
            prog.stop()


def _chunk_indices(n: int) -> list[int | None]:
    """Row indices to show (None: an ellipsis row) for ``n`` chunks."""
    if n <= MAX_CHUNK_ROWS:
        return list(range(n))
    half = MAX_CHUNK_ROWS // 2
    return [*range(half), None, *range(n - half, n)]


def ppl_tables(r: PerplexityResult, header: str) -> list[Any]:
    """``header`` (rich markup, escaped by the caller), the per-chunk table, the summary."""
    import math

    t = Table(title="chunks", title_justify="left")
    for col in ("chunk", "mean NLL", "chunk PPL", "running PPL"):
        t.add_column(col, justify="right")
    for i in _chunk_indices(r.chunks):
        if i is None:
            t.add_row("...", "", "", "")
            continue
        nll = r.nll_per_chunk[i]
        t.add_row(str(i + 1), f"{nll:.4f}", f"{math.exp(nll):.4f}", f"{r.running_ppl[i]:.4f}")
    s = Table(show_header=False, title="perplexity (llama-perplexity protocol)", title_justify="left")
    s.add_column(justify="left")
    s.add_column(justify="right")
    s.add_row("PPL", f"[bold]{r.ppl:.4f}[/bold] ± {r.ppl_stderr:.5f}")
    s.add_row("chunks x ctx", f"{r.chunks} x {r.ctx}")
    s.add_row("tokens scored", f"{r.tokens_scored} (of {r.n_tokens} in the text)")
    s.add_row("BOS first in each chunk", "yes" if r.add_bos else "no (the vocabulary adds none)")
    s.add_row("time", f"{r.seconds:.1f} s ({r.chunks * r.ctx / max(r.seconds, 1e-9):.1f} tok/s evaluated)")
    return [header, t, s]


def kld_tables(r: KLDResult, header: str) -> list[Any]:
    """``header`` (rich markup, escaped by the caller), the per-chunk table, PPL and KLD summaries."""
    o = r.overall
    t = Table(title="chunks (each chunk's own figures)", title_justify="left")
    for col in ("chunk", "PPL", "PPL base", "mean KLD", "max KLD", "same top", "RMS Δp"):
        t.add_column(col, justify="right")
    for i in _chunk_indices(r.chunks):
        if i is None:
            t.add_row(*(["..."] + [""] * 6))
            continue
        c = r.per_chunk[i]
        t.add_row(str(c["chunk"]), f"{c['ppl']:.4f}", f"{c['ppl_base']:.4f}", f"{c['kld_mean']:.6f}",
                  f"{c['kld_max']:.6f}", f"{100 * c['same_top']:.2f}%", f"{100 * c['delta_p_rms']:.3f}%")
    p = Table(show_header=False, title="perplexity", title_justify="left")
    p.add_column(justify="left")
    p.add_column(justify="right")
    p.add_row("PPL(Q)", f"[bold]{o['ppl']:.6f}[/bold] ± {o['ppl_stderr']:.6f}")
    p.add_row("PPL(base)", f"{o['ppl_base']:.6f} ± {o['ppl_base_stderr']:.6f}")
    if o["cor_ln_ppl"] is not None:
        p.add_row("Cor(ln PPL(Q), ln PPL(base))", f"{100 * o['cor_ln_ppl']:.2f}%")
    p.add_row("ln(PPL(Q)/PPL(base))", f"{o['ln_ppl_ratio']:.6f} ± {o['ln_ppl_ratio_stderr']:.6f}")
    p.add_row("PPL(Q)/PPL(base)", f"[bold]{o['ppl_ratio']:.6f}[/bold] ± {o['ppl_ratio_stderr']:.6f}")
    p.add_row("PPL(Q)-PPL(base)", f"{o['ppl_diff']:.6f} ± {o['ppl_diff_stderr']:.6f}")
    p.add_row("chunks x ctx, tokens scored", f"{r.chunks} x {r.ctx}, {o['tokens_scored']}")
    k = Table(show_header=False, title="KL divergence and top token", title_justify="left")
    k.add_column(justify="left")
    k.add_column(justify="right")
    kd, dp = o["kld"], o["delta_p"]
    k.add_row("Mean KLD", f"[bold]{kd['mean']:.6f}[/bold] ± {kd['stderr']:.6f}")
    names = {"max": "Maximum", "min": "Minimum", "median": "Median"}
    for key in ("max", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "p0_1", "min"):
        k.add_row(f"{names.get(key, key[1:].replace('_', '.') + '%')} KLD", f"{kd[key]:.6f}")
    k.add_row("Same top token",
              f"[bold]{100 * o['same_top']:.3f}%[/bold] ± {100 * o['same_top_stderr']:.3f}%")
    k.add_row("Mean Δp", f"{100 * dp['mean']:.3f}% ± {100 * dp['stderr']:.3f}%")
    for key in ("max", "p99", "p95", "median", "p5", "p1", "min"):
        k.add_row(f"{names.get(key, key[1:].replace('_', '.') + '%')} Δp", f"{100 * dp[key]:.3f}%")
    k.add_row("RMS Δp", f"{100 * dp['rms']:.3f}% ± {100 * dp['rms_stderr']:.3f}%")
    return [header, t, p, k]


def ppl_json(r: PerplexityResult, extra: dict[str, Any]) -> dict[str, Any]:
    d = dict(extra)
    d.update(r.as_dict())
    d["per_chunk"] = [{"chunk": i + 1, "nll": nll, "running_ppl": run}
                      for i, (nll, run) in enumerate(zip(r.nll_per_chunk, r.running_ppl, strict=True))]
    del d["nll_per_chunk"], d["running_ppl"]
    return d


def kld_json(r: KLDResult, extra: dict[str, Any]) -> dict[str, Any]:
    d = dict(extra)
    d.update(r.as_dict())
    d["ppl_stderr"] = r.overall["ppl_stderr"]
    return d
