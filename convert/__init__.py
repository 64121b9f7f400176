"""Conversion to GGUF and MLX: ``convert(src, out, fmt, qtype)``.

Streams one tensor at a time from the memory-mapped source (each source tensor is dequantized to
float32 for itself, quantized, written, dropped), into a temporary file/folder beside ``out`` that
is renamed at the end. Shows a rich progress bar (bytes/s, ETA) and a summary table of output
types and relative RMSE; ``verify=True`` reads the output back with our loaders and checks every
tensor against the source.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import markup_safe
from mlxtral.errors import FormatError, UsageError

from .atomic import atomic_output
from .output_guard import check_output, source_paths
from .policy import parse_precision
from .tensors import TensorReport

__all__ = ["ConvertResult", "convert", "infer_format", "VERIFY_TOLERANCE"]

# Worst relative RMSE (output vs source) --verify accepts per output type; far above what the
# quantizers give on real weights (Q4_0 ~0.1, Q8_0 ~0.004), far below what a layout bug gives (~1.4).
VERIFY_TOLERANCE = {"F32": 1e-6, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 0.03, "Q4_1": 0.2, "Q4_0": 0.25,
                    "Q5_0": 0.1, "Q5_1": 0.1, "Q6_K": 0.05, "Q5_K": 0.1, "Q4_K": 0.2, "Q3_K": 0.4,
                    "Q2_K": 0.7,
                    "affine8": 0.03, "affine4": 0.25, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}


@dataclass
class ConvertResult:
    out: Path
    fmt: str
    reports: list[TensorReport]
    seconds: float
    bytes_in: int
    bytes_out: int
    verified: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def infer_format(out: Path, fmt: str | None) -> str:
    if fmt:
        fmt = fmt.lower()
        if fmt not in ("gguf", "mlx"):
            raise UsageError(f"unknown output format {fmt!r}; use gguf or mlx")
        if fmt == "mlx" and out.suffix == ".gguf":
            raise UsageError("an MLX output is a folder; do not name it .gguf", out)
        return fmt
    return "gguf" if out.suffix.lower() == ".gguf" else "mlx"


def _open(path: Path) -> Any:
    try:
        from mlxtral.formats import open_checkpoint  # type: ignore[attr-defined]
    except ImportError:
        from mlxtral.formats.detect import open_checkpoint
    return open_checkpoint(path)


def _progress_bar(enabled: bool, total: int, console: Any = None) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("[bold]converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("convert", total=total)
    return bar, task


@contextlib.contextmanager
def _says_why_mlx(guessed: bool, out: Path) -> Iterator[None]:
    """A refusal of what an MLX folder cannot hold says the folder was OUT's name's choice."""
    try:
        yield
    except UsageError as e:
        if not guessed:
            raise
        raise UsageError(f"{e.message} (writing an MLX folder because {out.name!r} does not end in .gguf; "
                         "name it .gguf or pass --format gguf for a GGUF file)", e.path) from None


def convert(src: str | Path, out: str | Path, fmt: str | None = None, qtype: str = "q4",
            group_size: int = 64, force: bool = False, verify: bool = False, progress: bool = True,
            console: Any = None, max_shard_bytes: int | None = None,
            allow_requantize: bool = False) -> ConvertResult:
    """Convert the checkpoint at ``src`` (HF folder, original folder, GGUF, MLX folder) to ``out``.

    ``fmt``: "gguf" or "mlx" (default: from ``out``'s suffix). ``qtype``: q4, q4_1, q8, f16, bf16,
    f32 (or a GGUF type name), or for GGUF one of llama.cpp's K-quant mixes q2_k, q3_k_s, q3_k_m,
    q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (per-tensor types: :mod:`.kquant_mix`).
    ``group_size``: MLX affine group size (32, 64, 128).
    ``allow_requantize``: quantize tensors that are quantized already into another type (else a
    :class:`UsageError`, before any work; see :mod:`.preflight`).

    Interrupted or failed (KeyboardInterrupt, :class:`~mlxtral.errors.Terminated`, any error), it
    leaves no OUT (or the previous one untouched) and no temporary file, and raises that exception;
    a failed write of the output (a full disk...) raises :class:`.atomic.OutputError` naming OUT.
    """
    src, out = Path(src), Path(out)
    guessed = fmt is None and out.suffix.lower() != ".gguf"  # MLX because OUT is not named .gguf
    fmt = infer_format(out, fmt)
    with _says_why_mlx(guessed, out):
        prec = parse_precision(qtype, fmt)
        if fmt == "mlx" and group_size not in (32, 64, 128):
            raise UsageError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if not src.exists():
        raise FormatError("not found", src)
    sources = source_paths(src)
    check_output(out, is_dir=(fmt == "mlx"), force=force, sources=sources)
    ckpt = _open(src)
    from mlxtral.formats.mapped import install_sigbus_guard

    install_sigbus_guard()  # a source truncated while it is read: one line, not a silent death
    from .preflight import preflight

    with _says_why_mlx(guessed, out):
        checked = preflight(ckpt, fmt, prec, group_size, allow_requantize)  # before the bar: fail fast
    if guessed and console is not None and progress:
        console.print(f"[dim]{markup_safe(out.name)} does not end in .gguf: writing an MLX folder (--format "
                      "gguf for a GGUF file)[/dim]", highlight=False)
    bytes_in = sum(t.nbytes for t in ckpt.tensors.values())
    bar, task = _progress_bar(progress, bytes_in, console)
    t0 = time.perf_counter()

    def advance(n: int) -> None:
        if bar is not None:
            bar.update(task, advance=n)

    verified = False
    try:
        if bar is not None:
            bar.start()
        with atomic_output(out, is_dir=(fmt == "mlx"), force=force, sources=sources) as tmp:
            if fmt == "gguf":
                from .gguf_writer import write_gguf

                reports = write_gguf(ckpt, tmp, prec.qtype, progress=advance, vocab=checked.vocab)
            else:
                from .mlx_writer import MAX_SHARD_BYTES, write_mlx

                reports = write_mlx(ckpt, tmp, prec, group_size, progress=advance,
                                    max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES)
            if verify:
                verify_output(ckpt, tmp, fmt, prec, group_size)
                verified = True
    finally:
        if bar is not None:
            bar.stop()
    bytes_out = out.stat().st_size if fmt == "gguf" else sum(p.stat().st_size for p in out.iterdir())
    result = ConvertResult(out, fmt, reports, time.perf_counter() - t0, bytes_in, bytes_out, verified)
    if progress:
        print_summary(result, console)
    return result


def _out_kind(name: str, fmt: str, prec: Any, shape: tuple[int, ...], group_size: int = 64,
              args: Any = None) -> str:
    from .policy import gguf_tensor_type, mlx_quantizes

    if fmt == "gguf":
        return gguf_tensor_type(name, shape, prec.qtype, args=args)
    if prec.bits is not None and mlx_quantizes(name, shape, group_size):
        return f"affine{prec.bits}"
    return "float32" if len(shape) == 1 or "ffn_gate_inp" in name else prec.float_dtype


def verify_output(src_ckpt: Any, path: Path, fmt: str, prec: Any, group_size: int = 64) -> None:
    """Load the output with our own loaders and check every tensor against the source."""
    from mlxtral.quant.ggml import relative_rmse

    got = _open(path)
    if set(got.tensors) != set(src_ckpt.tensors):
        missing = sorted(set(src_ckpt.tensors) - set(got.tensors))[:3]
        raise FormatError(f"verify: output tensors differ from the source (missing {missing})", path)
    for name, s in src_ckpt.tensors.items():
        o = got.tensors[name]
        if tuple(o.shape) != tuple(s.shape):
            raise FormatError(f"verify: {name} has shape {o.shape}, source {s.shape}", path)
        a, b = s.dequantize(), o.dequantize()
        if not np.isfinite(b).all():
            raise FormatError(f"verify: {name} holds non-finite values", path)
        kind = _out_kind(name, fmt, prec, tuple(s.shape), group_size, src_ckpt.args)
        err = relative_rmse(a, b)
        if err > VERIFY_TOLERANCE.get(kind, 0.25):
            raise FormatError(f"verify: {name} ({kind}) differs from the source: "
                              f"relative RMSE {err:.3g}", path)


def _role(name: str) -> str:
    return re.sub(r"layers\.\d+\.|blk\.\d+\.", "", name)


def print_summary(result: ConvertResult, console: Any = None) -> None:
    """A rich table: per tensor (or per role over layers for big models), type and relative RMSE."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    reps = result.reports
    table = Table(title=f"{markup_safe(result.out)} ({result.fmt})")
    for col in ("tensor", "count", "source", "output", "size", "rel. RMSE (worst)"):
        table.add_column(col, justify="right" if col in ("count", "size") else "left")
    groups: dict[str, list[TensorReport]] = {}
    for r in reps:
        groups.setdefault(_role(r.name) if len(reps) > 40 else r.name, []).append(r)
    for key, rs in groups.items():
        worst = max(rs, key=lambda r: r.rel_rmse)
        size = sum(r.nbytes for r in rs)
        err = "copied" if all(r.copied for r in rs) else f"{worst.rel_rmse:.2e}"
        # a K-quant mix gives one role several types over the layers (ffn_down: Q6_K / Q4_K ...)
        table.add_row(key, str(len(rs)), ",".join(sorted({r.src_qtype for r in rs})),
                      ",".join(sorted({r.qtype for r in rs})),
                      f"{size / 1e6:,.1f} MB", err)
    console.print(table)
    gbps = result.bytes_in / max(result.seconds, 1e-9) / 1e6
    from mlxtral.memory import size_text

    console.print(f"{size_text(result.bytes_in)} -> {size_text(result.bytes_out)} in "
                  f"{result.seconds:.1f} s ({gbps:.0f} MB/s){'; verified' if result.verified else ''}")
