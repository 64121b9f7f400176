"""The ``mlxtral`` command (installed as the module mlxtral.cli): chat, generate, info, bench,
upcycle, convert. A thin layer over the Python API; heavy imports (numpy, the backends) happen
inside the commands so that ``mlxtral --help`` is fast.

Exit codes: 0 success, 1 a user's error (bad file, does not fit...), 2 a wrong argument,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM) during a conversion. Errors are one line on
stderr: ``error: <what>``.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from mlxtral.display import markup_safe

F = TypeVar("F", bound=Callable[..., Any])


def _hide_flag_types(params: list[Any]) -> list[Any]:
    """Plain flags (``--json``, ``--help``, ``--prefetch/--no-prefetch``) take no value: typer's rich
    help would print ``<bool>`` after them; an empty metavar shows nothing."""
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", "") is None:
            p.metavar = ""
    return params


def _click() -> Any:
    """The click typer runs on (typer >= 0.2x carries its own)."""
    click: Any = getattr(typer.core, "_click", None)
    if click is None:
        import click
    return click


# llama.cpp's multi-letter flags, which click would read as a one-letter flag and its value
# (``-ngl 99`` as ``-n gl``): refused by name, with what to do instead
LLAMA_LONG_SHORTS = {
    "-ngl": "mlxtral offloads no layers: --backend mlx runs the whole model on Apple's GPU, numpy on the CPU",
    "-fa": "llama.cpp's flash-attention switch: mlxtral has none",
    "-cnv": "for a conversation use 'mlxtral chat'", "-no-cnv": "'mlxtral generate' answers once",
    "-tb": "--threads (-t) sets the threads of prompt and generation alike",
    "-ctk": "mlxtral has no KV-cache type flag", "-ctv": "mlxtral has no KV-cache type flag",
    "-sm": "to split a model across processes or machines see --distributed",
    "-ts": "to split a model across processes or machines see --distributed",
}


def _refuse_run_together(cmd: Any, ctx: Any, args: list[str]) -> None:
    """An unknown single-dash word (``-ngl``, ``-fa``, ``-cnv``) where an option may stand is refused
    by name, not read as ``-n gl``. Values (the word after an option that takes one) are skipped."""
    known, takes_value = set(), set()
    for p in cmd.params:
        opts = [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
        known.update(opts)
        if getattr(p, "param_type_name", "") == "option" and not getattr(p, "is_flag", False):
            takes_value.update(o for o in opts if "=" not in o)
    i = 0
    while i < min(len(args), 1 << 16):
        a = args[i]
        if a == "--":
            return
        if a in takes_value:
            i += 2
            continue
        if 3 <= len(a) <= 64 and a[0] == "-" and a[1] != "-" and a[1:].replace("-", "").isalpha() \
                and a.isascii() and a not in known:
            hint = LLAMA_LONG_SHORTS.get(a)
            raise _click().exceptions.NoSuchOption(a, message=f"No such option: {a}" + (f" ({hint})" if hint
                                                   else ""), ctx=ctx)
        i += 1


class _Group(typer.core.TyperGroup):
    """The ``mlxtral`` command group: every command's ``--help`` shows no type after a plain flag."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _hide_flag_types(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _hide_flag_types(cmd.get_params(ctx))
            if not getattr(cmd, "_checks_run_together", False):
                parse = cmd.parse_args

                def parse_args(c: Any, args: list[str], _cmd: Any = cmd, _parse: Any = parse) -> Any:
                    _refuse_run_together(_cmd, c, args)
                    return _parse(c, args)

                cmd.parse_args, cmd._checks_run_together = parse_args, True
        return cmd

    def main(self, *args: Any, standalone_mode: bool = True, **kw: Any) -> Any:
        """As click's, but a wrong argument (unknown option, bad value, missing argument) is one line
        ``error: <command>: <problem> (see <command> --help)`` with exit 2, like every other error,
        not a framed block."""
        click = _click()
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kw)
        message = None
        try:
            rv = super().main(*args, standalone_mode=False, **kw)
        except click.exceptions.NoArgsIsHelpError as e:  # `mlxtral` alone: the help
            e.show()
            rv = e.exit_code
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message, rv = f"{where}{e.format_message()}{hint}".replace("\n", " "), e.exit_code
        except typer.Abort:
            message, rv = "aborted", 1
        except typer.Exit as e:
            rv = e.exit_code
        if message is not None:
            try:
                fail(message, rv)
            except typer.Exit:
                pass
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="mlxtral",
    help="Run Mixtral-shaped sparse mixture-of-experts models locally (GGUF, HF, Mistral original, MLX).\n\n"
    "Examples:\n\n"
    "  mlxtral chat                      # chat with the built-in demo model\n\n"
    "  mlxtral generate model.gguf -p 'Once upon a time' --max-tokens 64\n\n"
    "  mlxtral info model.gguf\n\n"
    "  mlxtral bench model.gguf -p 512 -n 128",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

WIDE = 1 << 14  # columns of a console that is not a terminal: tables and lines are never cut


class _Console(Console):
    """rich's Console, except that written to a pipe or a file (not a terminal, no $COLUMNS) its
    width is :data:`WIDE` instead of rich's 80 columns (or another stream's terminal width), so
    ``mlxtral info m | grep`` and ``bench > log`` keep whole tables and lines."""

    @property
    def size(self) -> Any:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal:  # type: ignore[has-type]
            return type(dims)(WIDE, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


err_console = _Console(stderr=True)
DEMO = "demo"
_closed_streams: set[str] = set()  # standard streams that were closed when the command started


def prepare_streams() -> None:
    """Standard streams a command can rely on. A closed one (``<&-``, ``>&-``, ``2>&-``) becomes
    /dev/null, on its descriptor too, so that no file opened later lands on 0, 1 or 2 and nothing
    writes to None (a command that needs stdout then says so: :func:`need_stdout`). Text the
    output's encoding cannot show (``PYTHONIOENCODING=ascii``) is written with replacements instead of
    raising UnicodeEncodeError."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name, None) is not None:
            continue
        _closed_streams.add(name)
        try:
            os.fstat(fd)
        except OSError:  # closed: give the descriptor /dev/null
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(os.devnull, "r" if fd == 0 else "w", encoding="utf-8"))  # noqa: SIM115
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", "replace") in ("strict", "surrogateescape"):
            try:
                stream.reconfigure(errors="replace")  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                pass


def need_stdout() -> None:
    """A command whose output goes to stdout refuses to run when stdout was closed (``>&-``)."""
    if "stdout" in _closed_streams:
        fail("stdout is closed: there is nowhere to write the output", 1)


def write_json(obj: Any, keep_unicode: bool = False) -> None:
    """One JSON line on stdout, non-ASCII text escaped; with ``keep_unicode`` (generated text) as is
    when stdout is UTF-8 (an ASCII stdout gets escapes, never UnicodeEncodeError)."""
    enc = (getattr(sys.stdout, "encoding", None) or "ascii").lower().replace("_", "-")
    sys.stdout.write(json.dumps(obj, ensure_ascii=not (keep_unicode and enc.startswith("utf"))) + "\n")


# ---- shared helpers -------------------------------------------------------------------------------


OUT_OF_MEMORY = "out of memory: try a smaller model, a smaller --max-context, or a quantized file"


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``. File-derived text in the
    message (tensor names, metadata, paths) cannot drive the terminal: control characters, ESC/CSI/OSC
    sequences and bidi overrides are printed as visible escapes (``\\x1b``)."""
    from mlxtral.display import term_safe

    rank = follower_rank()
    where = f"rank {rank}: " if rank is not None and not message.startswith(f"rank {rank}") else ""
    sys.stderr.write(f"error: {where}{term_safe(message, 4000)}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn users' errors into one line on stderr and an exit code scripts can trust."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mlxtral.errors import MlxtralError, Terminated

        try:
            return fn(*args, **kwargs)
        except MlxtralError as e:
            fail(" ".join(str(e).split()), e.exit_code)
        except (Terminated, KeyboardInterrupt, SystemError) as e:
            from mlxtral.chat import is_interrupt, terminated_by

            term = terminated_by(e)  # SIGTERM/SIGHUP, bare or wrapped in numba's SystemError by a kernel
            if term is not None:
                sys.stderr.write(f"\nterminated (signal {term.signum}); nothing was left behind\n")
                raise typer.Exit(128 + term.signum) from None
            if not is_interrupt(e):
                from mlxtral.address_space import explain

                if (why := explain(e)) is not None:  # under ulimit -v: an allocation in C failed
                    fail(str(why), why.exit_code)
                raise
            sys.stderr.write("\ninterrupted\n")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`mlxtral generate ... | head`): quietly stop.
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            except OSError:
                pass
            raise typer.Exit(0) from None
        except (MemoryError, RuntimeError, OSError, ImportError) as e:
            from mlxtral.address_space import explain, out_of_memory, release_reserve

            if out_of_memory(e) is not None:
                release_reserve()
            if (why := explain(e)) is not None:  # under ulimit -v: not enough address space
                fail(str(why), why.exit_code)
            if isinstance(e, MemoryError):
                fail(OUT_OF_MEMORY)
            if not isinstance(e, OSError):
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")

    return wrapper  # type: ignore[return-value]


def pick_model(command: str, model: str | None, flag: str | None, required: bool) -> str | None:
    """MODEL, or ``-m``/``--model`` MODEL (llama.cpp's and mlx-lm's habit): one of them; for the
    commands whose model has no default, one is needed (exit 2, as click's missing argument)."""
    where, see = f"mlxtral {command}: ", f" (see 'mlxtral {command} --help')"
    if model is not None and flag is not None:
        fail(f"{where}the model is given twice ({model!r} and -m {flag!r}): give MODEL or -m MODEL{see}", 2)
    if model is None and flag is None and required:
        fail(f"{where}missing the model: give MODEL or -m MODEL{see}", 2)
    return model if model is not None else flag


def resolve_model(model: str | None) -> Path:
    """A model path; ``None`` or ``demo`` (when no such file exists) is the built-in demo model."""
    if model is not None and (model != DEMO or Path(model).exists()):
        return Path(model).expanduser()
    from mlxtral.demo import ensure_demo_model

    status = err_console.status("building the demo model...", spinner="dots")

    def on_build(src: Path, out: Path) -> None:  # only when it is not built yet: no spinner otherwise
        err_console.print(f"[dim]building the demo model once: {markup_safe(src.name)} upcycled to 8 "
                          f"experts, top-2 -> {markup_safe(out)}[/dim]")
        status.start()

    try:
        return ensure_demo_model(on_build=on_build)
    finally:
        status.stop()


def load_model(model: str | None, backend: str, max_context: int | None, experts_per_token: int | None,
               quiet: bool = False, memory_budget: str | None = None, prefetch: bool = True,
               distributed: str | None = None, logits_rows: int = 1, dtype: str | None = None,
               asked: str | None = None, reads_stdin: bool = False) -> Any:
    """``mlxtral.load`` with the command's flags; ``asked``: what on the command line set
    ``max_context`` (default ``--max-context N``), for the line refusing more than the model's;
    ``reads_stdin``: the command reads stdin after loading (chat)."""
    import mlxtral
    from mlxtral.errors import ContextLengthError

    path = resolve_model(model)
    kw = dict(backend=backend, max_context=max_context, experts_per_token=experts_per_token,
              memory_budget=memory_budget, prefetch=prefetch, distributed=distributed,
              logits_rows=logits_rows, dtype=dtype)
    from mlxtral.backends import precompile

    follower = follower_rank() is not None
    try:
        if follower:  # silent: rank 0 says it
            precompile.notice = lambda line: None
        if quiet or follower:
            return _warm(mlxtral.load(path, **kw))
        precompile.notice = lambda line: err_console.print(f"[dim]{line}[/dim]", highlight=False)
        with err_console.status(f"loading {path.name}...", spinner="dots"):
            m = _warm(mlxtral.load(path, **kw))
    except ContextLengthError as e:
        fail(f"{asked or f'--max-context {e.asked}'}: above the model's context length {e.limit}", 2)
    if m.streaming:
        err_console.print(f"[dim]{m.memory_plan.describe()}[/dim]", highlight=False, soft_wrap=True)
    if distributed is not None and not reads_stdin:  # mlx.launch's relay need not poll rank 0's stdin
        from mlxtral.distributed.relay import quiet_relay

        quiet_relay()
    return m


def _warm(m: Any) -> Any:
    """The one-call decode step compiled (after an install, about a minute) or loaded from numba's
    disk cache now, while loading shows, rather than before the first token."""
    warm = getattr(m.backend, "warm", None)
    if warm is not None:
        warm(batch=False)
    return m


def follower_rank() -> int | None:
    """This process's rank when ``mlx.launch`` started it and it is not rank 0, else None."""
    try:
        from mlxtral.distributed.group import launched_rank
    except (MemoryError, OSError):  # called by fail(), maybe for a MemoryError: its line must come out
        return None
    r = launched_rank()
    return r if r else None


def follow_if_not_rank0(distributed: str | None, model: str | None, backend: str, max_context: int | None,
                        experts_per_token: int | None, threads: int | None, memory_budget: str | None = None,
                        prefetch: bool = True, dtype: str | None = None) -> None:
    """With --distributed, every rank but 0 loads its share and follows rank 0's forwards (never
    returning): it reads no prompt or stdin, binds no port and prints nothing but errors."""
    if distributed is None or follower_rank() is None:
        return
    apply_threads(threads)
    load_model(model, backend, max_context, experts_per_token, True, memory_budget, prefetch, distributed,
               dtype=dtype)
    raise typer.Exit(0)  # load() ends a follower's process itself


def apply_threads(n: int | None) -> None:
    """Use ``n`` threads in the NumPy backend's kernels (default: all cores); 1 to 256 (the kernels'
    thread pool), else one line and exit 2."""
    if n is None:
        return
    from mlxtral.backends import check_threads

    check_threads(n, "--threads")
    try:
        from mlxtral.backends.kernels import set_num_threads
    except ImportError:
        return
    set_num_threads(n)


def print_expert_stats(model: Any, as_json: bool = False) -> dict[str, Any] | None:
    counts = model.expert_counts()
    if counts is None:
        err_console.print("[dim]no expert statistics for this backend[/dim]")
        return None
    from mlxtral import expert_stats

    cache = model.expert_cache_stats()
    if as_json:
        d = expert_stats.as_dict(counts)
        if cache is not None:
            d["expert_cache"] = cache
        return d
    if cache is not None:
        err_console.print(expert_stats.cache_table(cache))
    if not model.config.is_moe:
        err_console.print("[dim]a dense model: every token uses its one FFN[/dim]")
        return None
    err_console.print(expert_stats.heatmap(counts))
    return None


# Options shared by several commands.
# Short flags mean what they mean in llama.cpp (llama-cli, llama-bench): -t threads, -c context,
# -n tokens, -p prompt (bench: prompt tokens), -s seed, -r repetitions (bench); none else.
BackendOpt = typer.Option("auto", "--backend", help="auto (MLX with Metal, else NumPy), numpy or mlx.")
DtypeOpt = typer.Option(None, "--dtype",
                        help="The MLX backend's compute dtype: float16 (the default on Metal), bfloat16 or "
                             "float32 (the default on MLX's CPU); NumPy computes in float32.")
MaxContextOpt = typer.Option(None, "--max-context", "-c", "--ctx-size", min=1,
                             help="KV cache size in tokens (default: the smaller of the model's and 4096).")
ExpertsOpt = typer.Option(None, "--experts-per-token", min=1,
                          help="Override the file's experts per token (top-k), e.g. 1 for speed.")
ExpertStatsOpt = typer.Option(False, "--expert-stats", help="Show the per-layer expert load at the end.")
ThreadsOpt = typer.Option(None, "--threads", "-t",
                         help="Threads for the CPU kernels, 1 to 256 (default: all cores, at most 256).")
BudgetOpt = typer.Option(None, "--memory-budget",
                         help="Memory the run may use, e.g. 12GB or 150MB (default: what is available). "
                              "A model larger than this streams its experts from disk.")
ModelOpt = typer.Option(None, "--model", "-m", metavar="MODEL", show_default=False,
                        help="The model, in place of MODEL (llama.cpp's -m, mlx-lm's --model).")
DistributedOpt = typer.Option(None, "--distributed",
                              help="expert (whole experts), expert-rows (a slice of every expert; on 2 "
                                   "NumPy ranks half of its width, one sum a layer) or "
                                   "pipeline (layers): split the model across the processes mlx.launch "
                                   "started (mlx.launch -n 2 --backend ring -- mlxtral ...).")
PrefetchOpt = typer.Option(True, "--prefetch/--no-prefetch",
                           help="When experts stream, read the next layer's likely experts ahead.")


STDIN_PROMPT_MAX = 16 << 20  # bytes of a prompt read from standard input (-p -)
EscapeOpt = typer.Option(True, "--escape/--no-escape", "-e",
                         help="Read \\n, \\r, \\t, \\', \\\", \\\\ and \\xHH in -p, -sys and --stop "
                              "as the characters they name (as llama-cli does; not in -f or stdin).")
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "'": b"'", '"': b'"', "\\": b"\\"}


def process_escapes(text: str) -> str:
    """llama.cpp's ``string_process_escapes``: ``\\n`` ``\\r`` ``\\t`` ``\\'`` ``\\"`` ``\\\\`` and
    ``\\xHH`` (a byte: UTF-8 written as bytes comes out whole) become what they name; any other
    backslash stays as typed. One pass over the text."""
    if "\\" not in text:
        return text
    out, i, n = bytearray(), 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            e = text[i + 1]
            if e in _ESCAPES:
                out += _ESCAPES[e]
                i += 2
                continue
            hx = text[i + 2 : i + 4]
            if e == "x" and len(hx) == 2 and all(h in "0123456789abcdefABCDEF" for h in hx):
                out.append(int(hx, 16))
                i += 4
                continue
        out += c.encode("utf-8", "surrogatepass")
        i += 1
    return out.decode("utf-8", errors="replace")


def _token_limit(max_tokens: int, m: Any) -> int:
    """``--max-tokens``, with llama.cpp's -1 (no limit) as the model's context, which bounds it."""
    return m.max_context if max_tokens == -1 else max_tokens


def _read_stdin(limit: int, distributed: str | None) -> bytes:
    """Standard input, at most ``limit`` bytes; under ``mlx.launch`` (which never closes a rank's
    stdin) until the launcher's own input has ended."""
    if distributed is not None:
        from mlxtral.distributed import relay

        if relay.under_launcher_pipe():
            return relay.relayed_input(limit)
    return sys.stdin.buffer.read(limit)


def _check_sampling(temp: float, top_p: float, top_k: int, min_p: float, repeat_penalty: float,
                    max_tokens: int, seed: int | None, stop: list[str] | None = None) -> int | None:
    """Every sampling flag checked (finite, in range; UsageError, exit 2); the seed (-1: None, random)."""
    from mlxtral.generate import check_stops
    from mlxtral.sampling import FLAG_NAMES, check_sampling, check_whole

    check_whole("--max-tokens", max_tokens, -1, note=" (-1: no limit)")
    check_stops(stop or [], "--stop")
    return check_sampling(temp, top_k, top_p, min_p, repeat_penalty, seed, names=FLAG_NAMES)["seed"]  # type: ignore[return-value]


# ---- chat -----------------------------------------------------------------------------------------


@app.command(help="Chat with a model (the built-in demo model when MODEL is omitted).\n\n"
             "Streams each answer and prints a stats line after it (on stderr). Commands: /reset, "
             "/system TEXT, /stats, /exit. Ctrl-C stops the current answer, Ctrl-D leaves. "
             "Piped input is answered line by line, then the chat ends.",
             epilog="Examples:\n\n  mlxtral chat\n\n  mlxtral chat model.gguf --system 'Answer briefly.'\n\n"
             "  echo 'Hi! Who are you?' | mlxtral chat --temp 0")
@handle_errors
def chat(
    model: str = typer.Argument(None, help="GGUF file or model folder; omitted: the built-in demo model."),  # noqa: B008
    model_opt: str = ModelOpt,
    system: str = typer.Option(None, "--system", "-sys", help="System prompt."),  # noqa: B008
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", "--n-predict",
                                   help="Longest answer, in tokens (-1: no limit but the context)."),
    temp: float = typer.Option(0.7, "--temp", help="Temperature, 0 to 100 (0 = greedy)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min_p x the top probability."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty",
                                         help="Repetition penalty, 0.5 to 10 (1 = off)."),
    seed: int = typer.Option(None, "--seed", "-s",  # noqa: B008
                             help="Random seed (reproducible answers), 0 to 2^64-1; -1: random."),
    backend: str = BackendOpt,
    dtype: str | None = DtypeOpt,
    max_context: int = MaxContextOpt,
    experts_per_token: int = ExpertsOpt,
    expert_stats: bool = ExpertStatsOpt,
    threads: int = ThreadsOpt,
    no_stats: bool = typer.Option(False, "--no-stats", help="Do not print the stats line after each answer."),
    memory_budget: str = BudgetOpt,
    prefetch: bool = PrefetchOpt,
    distributed: str = DistributedOpt,
) -> None:
    """Chat with a model (the built-in demo model when MODEL is omitted)."""
    model = pick_model("chat", model, model_opt, False)
    from mlxtral.chat import ChatLoop, SamplingOptions, read_interactive, read_piped

    follow_if_not_rank0(distributed, model, backend, max_context, experts_per_token, threads, memory_budget,
                        prefetch, dtype)
    need_stdout()
    seed = _check_sampling(temp, top_p, top_k, min_p, repeat_penalty, max_tokens, seed)
    apply_threads(threads)
    m = load_model(model, backend, max_context, experts_per_token, memory_budget=memory_budget,
                   prefetch=prefetch, distributed=distributed, dtype=dtype, reads_stdin=True)
    max_tokens = _token_limit(max_tokens, m)
    opts = SamplingOptions(max_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed)
    loop = ChatLoop(m, opts, system=system, show_stats=not no_stats)
    interactive = sys.stdin.isatty()
    if interactive:
        c = m.config
        from mlxtral.wording import plural

        kind = f"{plural(c.n_experts, 'expert')}, top-{c.n_experts_per_tok}" if c.is_moe else "dense"
        from rich.markup import escape

        from mlxtral.display import term_safe

        name = escape(term_safe(m.path.name, 200))  # a file name is neither markup nor terminal control
        err_console.print(f"[bold]{name}[/bold] [dim]({kind}, {plural(c.n_layers, 'layer')}, "
                          f"backend {m.backend_name}, context {m.max_context})[/dim]", highlight=False)
        err_console.print("[dim]/help for commands, Ctrl-C stops an answer, Ctrl-D leaves[/dim]")
        out_console = _Console()
        try:
            sys.stdin.reconfigure(errors="replace")  # type: ignore[attr-defined]
        except (AttributeError, ValueError):
            pass
        lines = read_interactive(lambda: out_console.input("[bold green]> [/bold green]"), sys.stderr)
    else:
        loop.echo = True
        lines = read_piped(sys.stdin)
        if distributed is not None:
            from mlxtral.distributed import relay

            if relay.under_launcher_pipe():  # mlx.launch never closes it: ends with the launcher's input
                lines = relay.relayed_lines()
    loop.run(lines)
    if expert_stats:
        print_expert_stats(m)
    if loop.failed and loop.echo:  # piped: a script learns that a turn was refused
        raise typer.Exit(1)


# ---- generate -------------------------------------------------------------------------------------


@app.command(epilog="Examples:\n\n"
             "  mlxtral generate model.gguf -p 'The capital of France is' --max-tokens 16 --temp 0\n\n"
             "  mlxtral generate model.gguf -p 'Write a haiku about the sea' --chat --json\n\n"
             "  echo 'Summarize: ...' | mlxtral generate model.gguf -p - --chat")
@handle_errors
def generate(
    model: str = typer.Argument(None, help="GGUF file or model folder ('demo': the built-in demo model)."),  # noqa: B008
    model_opt: str = ModelOpt,
    prompt: str = typer.Option(None, "--prompt", "-p",  # noqa: B008
                               help="The prompt ('-' reads stdin, its last line break dropped as -f's)."),
    prompt_file: Path = typer.Option(None, "--file", "-f",  # noqa: B008
                                     help="Read the prompt from this file (UTF-8), as llama-cli's -f."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", "--n-predict",
                                   help="Tokens to generate at most (-1: until the end or a full context)."),
    temp: float = typer.Option(0.0, "--temp", help="Temperature, 0 to 100 (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty",
                                         help="Repetition penalty, 0.5 to 10 (1 = off)."),
    seed: int = typer.Option(None, "--seed", "-s", help="Random seed, 0 to 2^64-1; -1: random."),  # noqa: B008
    chat_: bool = typer.Option(False, "--chat", help="Apply the model's chat template to the prompt."),
    system: str = typer.Option(None, "--system", "-sys",  # noqa: B008
                               help="System prompt (implies --chat)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),  # noqa: B008
    escape: bool = EscapeOpt,
    backend: str = BackendOpt,
    dtype: str | None = DtypeOpt,
    max_context: int = MaxContextOpt,
    experts_per_token: int = ExpertsOpt,
    expert_stats: bool = ExpertStatsOpt,
    threads: int = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the text and the stats as one JSON object."),
    memory_budget: str = BudgetOpt,
    prefetch: bool = PrefetchOpt,
    distributed: str = DistributedOpt,
) -> None:
    """Generate text from a prompt, streamed to stdout; the stats line goes to stderr."""
    model = pick_model("generate", model, model_opt, True)
    follow_if_not_rank0(distributed, model, backend, max_context, experts_per_token, threads, memory_budget,
                        prefetch, dtype)
    need_stdout()
    if escape:
        stop = [process_escapes(x) for x in stop] if stop else stop
        system = process_escapes(system) if system is not None else None
    seed = _check_sampling(temp, top_p, top_k, min_p, repeat_penalty, max_tokens, seed, stop)
    chat_ = chat_ or system is not None  # a system prompt is a chat's (llama-cli's -sys implies chat too)
    if (prompt is None) == (prompt_file is None):
        fail("give the prompt with -p TEXT (or -p - for stdin) or -f FILE, one of them", 2)
    if prompt_file is not None:
        from mlxtral.errors import MlxtralError
        from mlxtral.formats.files import read_side_file

        prompt = read_side_file(prompt_file, MlxtralError, limit=STDIN_PROMPT_MAX).decode("utf-8", "replace")
        prompt = prompt.removesuffix("\n")  # as llama-cli -f: the last line break is not the prompt
    elif prompt == "-":  # bounded: no context holds more (a prompt that fits is tokenized whole)
        raw = _read_stdin(STDIN_PROMPT_MAX + 1, distributed)
        if len(raw) > STDIN_PROMPT_MAX:
            fail(f"the prompt on standard input is over {STDIN_PROMPT_MAX >> 20} MiB: no context holds it", 2)
        prompt = raw.decode("utf-8", errors="replace").removesuffix("\n")  # as -f: `echo ... |` adds one
    elif escape:
        prompt = process_escapes(prompt)
    if not prompt:
        fail("the prompt is empty", 2)
    apply_threads(threads)
    m = load_model(model, backend, max_context, experts_per_token, quiet=as_json, memory_budget=memory_budget,
                   prefetch=prefetch, distributed=distributed, dtype=dtype)
    if chat_:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": prompt})
        ids = m.apply_chat_template(msgs)
    else:
        ids = m.prompt_ids(prompt, chat=False)
    from mlxtral.chat import deferred_sigint, stream_interruptibly
    from mlxtral.display import text_safe

    shown = text_safe if sys.stdout.isatty() else str  # a terminal sees control characters, not obeys them
    max_tokens = _token_limit(max_tokens, m)
    parts: list[str] = []
    stats = None
    with deferred_sigint() as flag:
        gen = m.stream(ids, max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repeat_penalty, seed=seed, stop=stop or (), chat=chat_)
        for r in stream_interruptibly(gen, flag):
            parts.append(r.text)
            if not as_json and r.text:
                sys.stdout.write(shown(r.text))
                sys.stdout.flush()
            if r.stats is not None:
                stats = r.stats
    interrupted = stats is not None and stats.finish_reason == "interrupted"
    if as_json:
        out: dict[str, Any] = {"model": str(m.path), "backend": m.backend_name, "dtype": m.dtype,
                               "prompt": prompt, "chat": chat_, "text": "".join(parts),
                               "finish_reason": stats.finish_reason if stats else None,
                               "stats": stats.as_dict() if stats else None}
        if expert_stats:
            out["expert_stats"] = print_expert_stats(m, as_json=True)
        write_json(out, keep_unicode=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats is not None:
            sys.stderr.write(f"{stats.summary()} | finish: {stats.finish_reason}\n")
        if expert_stats:
            print_expert_stats(m)
    if interrupted:
        raise typer.Exit(130)


# ---- serve ----------------------------------------------------------------------------------------


@app.command(help="Serve a model over an OpenAI-compatible HTTP API (the demo model when MODEL is "
             "omitted): /v1/chat/completions, /v1/completions, /v1/models, /health. Requests are "
             "batched continuously; Ctrl-C or SIGTERM lets the running requests finish, then exits.",
             epilog="Examples:\n\n  mlxtral serve\n\n  mlxtral serve model.gguf --port 8080 --parallel 4\n\n"
             "  mlxtral serve model.gguf --host 0.0.0.0 --api-key SECRET")
@handle_errors
def serve(
    model: str = typer.Argument(None, help="GGUF file or model folder; omitted: the built-in demo model."),  # noqa: B008
    model_opt: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    parallel: int = typer.Option(8, "--parallel", "-np", min=1, max=256,
                                 help="Requests generated at once (slots); more wait in the queue."),
    max_queue: int = typer.Option(64, "--max-queue", min=0,
                                  help="Requests that may wait for a slot; past that: 503."),
    prefill_chunk: int = typer.Option(128, "--prefill-chunk", min=1, max=65536,
                                      help="Prompt tokens prefilled per step, in the same forward as "
                                           "the running requests' next tokens (larger: fewer, longer "
                                           "steps while prompts prefill; the running requests pause "
                                           "longer)."),
    api_key: str = typer.Option(None, "--api-key",  # noqa: B008
                                help="Require 'Authorization: Bearer KEY' on every request but /health."),
    alias: str = typer.Option(None, "--alias", "-a",  # noqa: B008
                              help="The model id clients see in /v1/models and responses (default: the "
                                   "file's name)."),
    log_requests: bool = typer.Option(True, "--log-requests/--no-log-requests",
                                      help="A line on stderr per finished request (tokens, tok/s, "
                                           "time to first token, finish)."),
    prompt_cache: str = typer.Option("2GB", "--prompt-cache",
                                     help="Memory for KV caches of finished requests, reused by prompts "
                                          "sharing a prefix (0: off)."),
    temp: float = typer.Option(0.8, "--temp", help="Temperature of a request that gives none (llama-server's "
                               "default; 0 = greedy)."),
    top_k: int = typer.Option(40, "--top-k", help="top_k of a request that gives none (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="top_p of a request that gives none (1 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="min_p of a request that gives none (0 = off)."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty",
                                         help="repetition_penalty of a request that gives none (1 = off)."),
    backend: str = BackendOpt,
    dtype: str | None = DtypeOpt,
    max_context: int = MaxContextOpt,
    threads: int = ThreadsOpt,
    memory_budget: str = BudgetOpt,
    distributed: str = DistributedOpt,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    model = pick_model("serve", model, model_opt, False)
    from mlxtral.sampling import SamplingParams
    from mlxtral.server import bind, check_api_key, check_installed, run

    follow_if_not_rank0(distributed, model, backend, max_context, None, threads, memory_budget, dtype=dtype)
    check_installed()
    check_api_key(api_key)
    _check_sampling(temp, top_p, top_k, min_p, repeat_penalty, 1, None)
    sampling = SamplingParams(temp, top_k, top_p, min_p, repeat_penalty)
    if alias is not None and not (0 < len(alias) <= 256 and alias.isprintable()):
        fail("--alias must be 1 to 256 printable characters", 2)
    cache_bytes = 0
    if prompt_cache.strip() not in ("0", ""):
        from mlxtral.expert_cache.plan import parse_size

        cache_bytes = parse_size(prompt_cache) or 0
    apply_threads(threads)
    sock = bind(host, port)  # before the model loads: a taken port is one line at once
    m = load_model(model, backend, max_context, None, memory_budget=memory_budget, distributed=distributed,
                   dtype=dtype)
    h, p = sock.getsockname()[:2]
    shown = f"[{h}]" if ":" in h else h

    def ready() -> None:
        from mlxtral.display import term_safe

        sys.stderr.write(f"mlxtral serve: {term_safe(alias or m.path.name, 200)} (backend {m.backend_name}, "
                         f"context {m.max_context}, "
                         f"{parallel} slots) on http://{shown}:{p}/v1\n")
        sys.stderr.flush()

    def log(line: str) -> None:
        sys.stderr.write(f"mlxtral serve: {line}\n")
        sys.stderr.flush()

    run(m, sock, parallel=parallel, max_queue=max_queue, api_key=api_key, prompt_cache_bytes=cache_bytes,
        prefill_chunk=prefill_chunk, on_ready=ready, model_name=alias, log=log if log_requests else None,
        sampling=sampling)
    sys.stderr.write("mlxtral serve: stopped\n")


# ---- info -----------------------------------------------------------------------------------------


@app.command(epilog="Examples:\n\n  mlxtral info model.gguf\n\n"
             "  mlxtral info ./Mixtral-8x7B-Instruct-v0.1 --json\n\n"
             "  mlxtral info demo")
@handle_errors
def info(
    model: str = typer.Argument(None, help="GGUF file or model folder ('demo': the built-in demo model)."),  # noqa: B008
    model_opt: str = ModelOpt,
    max_context: int = MaxContextOpt,
    experts_per_token: int = ExpertsOpt,
    backend: str = BackendOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    memory_budget: str = BudgetOpt,
) -> None:
    """Describe a model: format, architecture, parameters (all and active), tensor types, memory."""
    model = pick_model("info", model, model_opt, True)
    from mlxtral.info import describe, render

    need_stdout()
    d = describe(resolve_model(model), max_context=max_context, experts_per_token=experts_per_token,
                 backend=backend, memory_budget=memory_budget)
    if as_json:
        write_json(d)
    else:
        _Console().print(render(d))


# ---- bench ----------------------------------------------------------------------------------------


@app.command(epilog="Examples:\n\n  mlxtral bench model.gguf\n\n"
             "  mlxtral bench model.gguf -p 128 -n 64 -r 5 --json\n\n"
             "  mlxtral bench model.gguf --compare llama.cpp --llamacpp-python ~/llamacpp/bin/python")
@handle_errors
def bench(
    model: str = typer.Argument(None, help="GGUF file or model folder ('demo': the built-in demo model)."),  # noqa: B008
    model_opt: str = ModelOpt,
    n_prompt: str = typer.Option("512", "--n-prompt", "-p", metavar="N[,N...]",
                                 help="Prompt tokens to prefill (pp): a count or a comma list."),
    n_gen: str = typer.Option("128", "--n-gen", "-n", metavar="N[,N...]",
                              help="Tokens to generate one at a time (tg): a count or a comma list."),
    repeats: int = typer.Option(3, "--repetitions", "-r", min=1, help="Timed runs of each test."),
    bandwidth: float = typer.Option(None, "--bandwidth",
                                    help="This machine's memory bandwidth in GB/s, 0.001 to 100000 "
                                    "(default: measured)."),
    compare: str = typer.Option(None, "--compare", help="Also run 'llama.cpp' on the same file."),  # noqa: B008
    llamacpp_python: str = typer.Option(None, "--llamacpp-python",
                                        help="Interpreter with llama-cpp-python (default: "
                                        "$MLXTRAL_LLAMACPP_PYTHON or ~/llamacpp/bin/python)."),
    threads: int = typer.Option(None, "--threads", "-t",  # noqa: B008
                                help="Threads for our kernels and for llama.cpp, 1 to 256 (default: all "
                                "cores, at most 256)."),
    backend: str = BackendOpt,
    dtype: str | None = DtypeOpt,
    experts_per_token: int = ExpertsOpt,
    expert_stats: bool = ExpertStatsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (as -o json)."),
    output: str = typer.Option("table", "--output", "-o",
                               help="table, md, csv, json or jsonl (llama-bench's -o: a row per test "
                                    "and engine in md/csv/jsonl)."),
    memory_budget: str = BudgetOpt,
    prefetch: bool = PrefetchOpt,
    distributed: str = DistributedOpt,
) -> None:
    """Measure prompt processing and generation speed (llama-bench style), against the seed figures."""
    model = pick_model("bench", model, model_opt, True)
    from mlxtral.bench import (
        OUTPUTS,
        Timing,
        check_probe_fits,
        format_rows,
        measure_bandwidth,
        model_figures,
        parse_counts,
        result_rows,
        run_llamacpp,
        run_tests,
        seed_rows,
    )
    from mlxtral.info import active_weight_bytes
    from mlxtral.sampling import check_number

    need_stdout()
    if compare is not None and compare.lower().replace("_", ".") not in ("llama.cpp", "llamacpp"):
        fail(f"--compare {compare[:40]}: only 'llama.cpp' is supported", 2)
    if bandwidth is not None:
        check_number("--bandwidth", bandwidth, 0.001, 1e5)
    output = output.strip().lower()
    if output not in OUTPUTS:
        fail(f"-o {output[:40]!r}: one of {', '.join(OUTPUTS)}", 2)
    as_json = as_json or output == "json"
    quiet = as_json or output != "table"  # a script reads stdout: no spinner, no tables
    pps, tgs = parse_counts("-p", n_prompt), parse_counts("-n", n_gen)
    if not any(pps + tgs):
        fail("-p and -n must be >= 0 and not both 0", 2)
    need = max(max(pps), max(tgs) + 1) + 1
    follow_if_not_rank0(distributed, model, backend, need, experts_per_token, threads, memory_budget,
                        prefetch, dtype)
    apply_threads(threads)
    path = resolve_model(model)
    m = load_model(str(path), backend, need, experts_per_token, quiet=quiet, memory_budget=memory_budget,
                   prefetch=prefetch, distributed=distributed, dtype=dtype,
                   asked=f"-p {max(pps)} and -n {max(tgs)} need {need} positions")
    if bandwidth is None:  # the probe runs after the tests: a limit it cannot fit refused before them
        check_probe_fits()
    load_before = _load_average()
    status = err_console.status("benchmarking...", spinner="dots") if not quiet else None
    if status:
        status.start()
    try:
        tests, peak = run_tests(m, pps, tgs, repeats,
                                progress=(lambda s: status.update(f"benchmarking: {s}")) if status else None)
        # every rank's figures now, as the runs left them: the bandwidth probe below would add its
        # buffers to rank 0's peak RSS
        ranks = m.backend.stats() if distributed is not None else None
        if status:
            status.update("measuring memory bandwidth...")
        bw_measured = bandwidth is None
        bw = bandwidth if bandwidth is not None else measure_bandwidth()
        llama = None
        if compare is not None:
            if m.checkpoint.format != "gguf":
                fail("--compare llama.cpp needs a GGUF file", 2)
            if status:
                status.update("running llama.cpp on the same file...")
            llama = run_llamacpp(path, [n for n in pps if n], [n for n in tgs if n], repeats,
                                 threads or os.cpu_count() or 1,
                                 python=llamacpp_python)
    finally:
        if status:
            status.stop()
    active = active_weight_bytes(m.checkpoint)
    first = {t.kind: t for t in reversed(tests)}  # the first pp and the first tg test
    pp_t = first["pp"].timing if "pp" in first else Timing([])
    tg_t = first["tg"].timing if "tg" in first else Timing([])
    seeds = seed_rows(bw, active, tg_t.mean)
    lbest = (llama or {}).get("tests") or {}
    rows = [{"test": t.label, "n_prompt": t.n if t.kind == "pp" else 0, "n_gen": t.n if t.kind == "tg" else 0,
             "tok_s": t.timing.as_dict(), "llama_cpp_tok_s": lbest.get(t.label),
             "ratio_vs_llama_cpp": round(t.timing.best / lbest[t.label], 3) if lbest.get(t.label) else None}
            for t in tests]
    out = {
        "model": str(path), "backend": m.backend_name, "dtype": m.dtype, "format": m.checkpoint.format,
        "n_experts": m.config.n_experts, "experts_per_token": m.config.n_experts_per_tok,
        "pp": first["pp"].n if "pp" in first else 0, "tg": first["tg"].n if "tg" in first else 0,
        "repeats": repeats, "threads": threads or os.cpu_count() or 1,
        "pp_tok_s": pp_t.as_dict(), "tg_tok_s": tg_t.as_dict(),  # the first -p and -n values' tests
        "tests": rows,  # every test, as llama-bench's rows
        **model_figures(m.checkpoint),  # model_type, model_size, model_n_params (llama-bench's)
        "peak_memory_bytes": peak, "active_bytes_per_token": active,
        "bandwidth_gbs": round(bw, 3), "bandwidth_measured": bw_measured,
        "ceiling_tg_tok_s": round(bw * 1e9 / active, 2) if active else None,
        "seeds": seeds,
        "memory_plan": m.memory_plan.as_dict() if m.memory_plan is not None else None,
        "expert_cache": m.expert_cache_stats(),
        "load_average": load_before,  # the 1-minute load when the runs began (None: not known here)
    }
    if m.backend_name == "numpy":  # native library, numba's JIT or NumPy; and the dot-product path
        from mlxtral.backends import kernels

        out["kernels"], out["kernel_isa"] = kernels.describe()
    if distributed is not None:
        out["distributed"] = {"mode": distributed, "ranks": ranks}
    if llama is not None:
        out["llama_cpp"] = llama
        out["ratio_vs_llama_cpp"] = {
            "pp": round(pp_t.best / llama["pp_tok_s"], 3) if llama.get("pp_tok_s") and pp_t.runs else None,
            "tg": round(tg_t.best / llama["tg_tok_s"], 3) if llama.get("tg_tok_s") and tg_t.runs else None,
            "note": "best of the runs on both sides",
        }
    if expert_stats:
        out["expert_stats"] = print_expert_stats(m, as_json=True) if as_json else None
    if as_json:
        write_json(out)
        return
    if output != "table":
        sys.stdout.write(format_rows(result_rows(out), output))
        sys.stdout.flush()
        return
    _print_bench(out, tests)
    if expert_stats:
        print_expert_stats(m)


def _load_average() -> float | None:
    """The 1-minute load average (None where the system does not keep one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _print_bench(out: dict[str, Any], tests: list[Any]) -> None:
    from rich.table import Table

    con = _Console()
    from rich.text import Text

    from mlxtral.display import term_safe

    # a file name is neither rich markup nor terminal control
    kernels = f", kernels: {out['kernels']} ({out['kernel_isa']})" if out.get("kernels") else ""
    title = Text(f"{term_safe(Path(out['model']).name, 200)} ({out['backend']}, {out['dtype']}{kernels})",
                 style="italic")
    con.print(title, highlight=False, overflow="ignore", crop=False)  # a whole line: never wrapped in a name
    t = Table()
    for col, just in (("engine", "left"), ("threads", "right"), ("test", "left"), ("tok/s", "right"),
                      ("best", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    threads = str(out["threads"])  # as llama-bench's column: both engines run with -t
    for test in tests:
        t.add_row("mlxtral", threads, test.label, str(test.timing), f"{test.timing.best:.2f}")
    ll = out.get("llama_cpp")
    if ll:
        for row in out["tests"]:
            best = row["llama_cpp_tok_s"]
            if best:  # llama.cpp's runner reports its best run only
                t.add_row("llama.cpp", threads, row["test"], f"{best:.2f} (best)",
                          f"{best:.2f}  (ours x{row['ratio_vs_llama_cpp']:.2f})")
    con.print(t)
    load, cores = out.get("load_average"), os.cpu_count() or 1
    if load is not None and load > cores / 2:
        con.print(f"[yellow]the machine was busy when the runs began (load {load:.1f} on {cores} cores): "
                  "these figures, and the ratios to llama.cpp, are not to be trusted[/yellow]",
                  highlight=False)
    if out.get("expert_cache"):
        from mlxtral.expert_stats import cache_table

        con.print(cache_table(out["expert_cache"]))
    con.print(f"peak memory {out['peak_memory_bytes'] / 1e9:.2f} GB"
              + (f" (llama.cpp {ll['peak_rss_mb'] / 1e3:.2f} GB)" if ll and ll.get("peak_rss_mb") else "")
              + f"; {out['active_bytes_per_token'] / 1e6:.1f} MB of weights read per token; "
              f"bandwidth {out['bandwidth_gbs']:.1f} GB/s "
              f"({'measured' if out['bandwidth_measured'] else 'given'})"
              f" -> decode ceiling {out['ceiling_tg_tok_s']:.1f} tok/s", highlight=False)
    ceiling = out["ceiling_tg_tok_s"]
    tg_best = max((test.timing.best for test in tests if test.kind == "tg"), default=0.0)
    if tg_best and ceiling and tg_best > ceiling * 1.05:
        why = ("the bandwidth probe read low (was the machine loaded?); measure again, or give --bandwidth"
               if out["bandwidth_measured"] else "the --bandwidth given is below what decode reached "
               "(or the weights fit in the CPU's caches)")
        con.print(f"[yellow]decode ran above that ceiling: {why}; the efficiencies below are too high"
                  "[/yellow]", highlight=False)
    if tg_best:
        s = Table(title="decode vs the seed figures, scaled to this machine's bandwidth and this model",
                  title_justify="left")
        for col in ("setup", "tok/s there", "of its ceiling", "tok/s here at that efficiency"):
            s.add_column(col, justify="left" if col == "setup" else "right")
        for row in out["seeds"]:
            eff = f"{100 * row['efficiency']:.0f}%" if row["efficiency"] is not None else "-"
            s.add_row(row["setup"], f"{row['tok_s']:.1f}", eff, f"{row['scaled_here_tok_s']:.1f}")
        con.print(s)


# ---- perplexity -----------------------------------------------------------------------------------


@app.command(help="Perplexity over a text file with llama-perplexity's protocol, and KL divergence against "
             "a reference run.\n\n"
             "The text is tokenized once and cut into floor(tokens / ctx) chunks; each is evaluated from an "
             "empty cache (BOS first where the vocabulary adds it) and its second half is scored, so numbers "
             "compare with llama.cpp's. --kl-divergence-base F alone also saves the model's "
             "log-probabilities to F (llama.cpp's format, 2 bytes per vocabulary entry and scored token); "
             "with --kl-divergence it compares this model with F instead (KLD percentiles, top-token "
             "agreement, PPL ratio).\n\n"
             "No dataset at hand? 'python -m mlxtral.evaluation.sample_text topics.txt' writes Python's "
             "own language-reference topics (~465 K characters).",
             epilog="Examples:\n\n  python -m mlxtral.evaluation.sample_text topics.txt\n\n"
             "  mlxtral perplexity model.gguf -f topics.txt --chunks 20\n\n"
             "  mlxtral perplexity model.F16.gguf -f topics.txt --kl-divergence-base f16.kld\n\n"
             "  mlxtral perplexity model.Q4_0.gguf --kl-divergence-base f16.kld --kl-divergence --json")
@handle_errors
def perplexity(
    model: str = typer.Argument(None, help="GGUF file or model folder; omitted: the built-in demo model."),  # noqa: B008
    model_opt: str = ModelOpt,
    text_file: Path = typer.Option(None, "--file", "-f",  # noqa: B008
                                   help="The text (UTF-8). Optional with --kl-divergence (the base holds "
                                   "the tokens; given, it must be the base's text)."),
    ctx: int = typer.Option(None, "--ctx", "-c",  # noqa: B008
                            help="Tokens per chunk, even, >= 4 (default 512; with --kl-divergence: the "
                            "base's)."),
    chunks: int = typer.Option(None, "--chunks", help="Evaluate at most this many chunks."),  # noqa: B008
    kl_base: Path = typer.Option(None, "--kl-divergence-base",  # noqa: B008
                                 help="File of reference log-probabilities: written (alone) or read (with "
                                 "--kl-divergence)."),
    kl: bool = typer.Option(False, "--kl-divergence", help="Compare with --kl-divergence-base."),
    backend: str = BackendOpt,
    dtype: str | None = DtypeOpt,
    experts_per_token: int = ExpertsOpt,
    threads: int = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    memory_budget: str = BudgetOpt,
    prefetch: bool = PrefetchOpt,
) -> None:
    """Perplexity (llama-perplexity's protocol) and KL divergence against a reference run."""
    model = pick_model("perplexity", model, model_opt, False)
    from mlxtral.evaluation import kld as kld_mod
    from mlxtral.evaluation import perplexity as ppl_mod
    from mlxtral.evaluation import report

    need_stdout()
    if kl and kl_base is None:
        fail("--kl-divergence needs --kl-divergence-base FILE (the reference's log-probabilities)", 2)
    if not kl and text_file is None:
        fail("the text is missing: give it with -f FILE (e.g. python -m mlxtral.evaluation.sample_text "
             "topics.txt)", 2)
    if chunks is not None and chunks < 1:
        fail(f"--chunks {chunks}: must be at least 1", 2)
    base = None
    if kl:
        base = kld_mod.read_base(kl_base)  # before loading: a wrong file fails fast
        if ctx is not None and ctx != base.n_ctx:
            fail(f"--ctx {ctx}: {kl_base} was computed with ctx {base.n_ctx} (leave --ctx out)", 2)
        ctx = base.n_ctx
    else:
        ctx = ppl_mod.DEFAULT_CTX if ctx is None else ctx
        ppl_mod.check_ctx(ctx, name="--ctx")
    text = ppl_mod.read_text(text_file) if text_file is not None else None
    apply_threads(threads)
    from mlxtral.errors import OutOfMemoryError

    base_ctx = f"{kl_base} was computed with ctx {ctx}"  # with --kl-divergence: what set the context
    try:
        # a chunk at a time from an empty cache: the KV cache holds --ctx positions, and a chunk's
        # logits are computed at once (both in the memory plan)
        m = load_model(model, backend, ctx, experts_per_token, quiet=as_json, memory_budget=memory_budget,
                       prefetch=prefetch, logits_rows=ctx, dtype=dtype,
                       asked=base_ctx if kl else f"--ctx {ctx}")
    except OutOfMemoryError as e:
        why = base_ctx if kl else "a smaller --ctx needs less"
        fail(f"{' '.join(str(e).split())} (the working set holds {ctx} positions' logits at once: {why})",
             e.exit_code)
    ppl_mod.check_ctx(ctx, m.config.max_position_embeddings, allow_odd=kl,
                      name=f"{kl_base}: its context" if kl else "--ctx")
    info = {"model": str(m.path), "backend": m.backend_name, "dtype": m.dtype,
            "text": str(text_file) if text_file else None}
    from rich.markup import escape

    from mlxtral.display import term_safe

    name = escape(term_safe(m.path.name, 200))
    if kl:
        with report.progress_bar(err_console, "KL divergence", enabled=not as_json) as prog:
            res = kld_mod.kl_divergence(m, kl_base, text, chunks=chunks, progress=prog)
        if as_json:
            write_json(report.kld_json(res, info))
            return
        con = _Console()
        header = f"[bold]{name}[/bold] ({m.backend_name}) vs base {escape(term_safe(kl_base.name, 200))}"
        for t in report.kld_tables(res, header):
            con.print(t, highlight=False)
        return
    if kl_base is not None:  # never the text, a file of the model, or a file that is not a base
        from mlxtral.convert.output_guard import check_output, source_paths

        check_output(kl_base, is_dir=False, force=True, kind=kld_mod.BASE_FILE,
                     sources=[q for p in (text_file, m.path) if os.path.lexists(p) for q in source_paths(p)])
    with report.progress_bar(err_console, "perplexity", enabled=not as_json) as prog:
        r = m.perplexity(text, ctx=ctx, chunks=chunks, progress=prog, kl_base=kl_base)
    if as_json:
        d = report.ppl_json(r, info)
        d["kl_divergence_base"] = str(kl_base) if kl_base is not None else None
        write_json(d)
        return
    con = _Console()
    for t in report.ppl_tables(r, f"[bold]{name}[/bold] ({m.backend_name}), ctx {ctx}"):
        con.print(t, highlight=False)
    if kl_base is not None:
        err_console.print(f"saved the log-probabilities to {escape(term_safe(str(kl_base), 300))} "
                          f"({kl_base.stat().st_size / 1e6:.1f} MB)", highlight=False)


# ---- upcycle --------------------------------------------------------------------------------------


@app.command(help="Turn a dense GGUF into a Mixtral-shaped one with E identical experts and a random "
             "router.\n\nThe experts are copies of the dense FFN (quantized blocks copied as they are), so "
             "the result computes exactly what the dense model computes, whatever the router picks.",
             epilog="Examples:\n\n  mlxtral upcycle SmolLM2-135M.Q4_1.gguf smol-8x.gguf --experts 8\n\n"
             "  mlxtral upcycle dense.gguf moe.gguf --experts 4 --top-k 1 --seed 1")
@handle_errors
def upcycle(
    src: Path = typer.Argument(..., help="A dense llama-family GGUF."),  # noqa: B008
    out: Path = typer.Argument(..., help="The Mixtral-shaped GGUF to write."),  # noqa: B008
    experts: int = typer.Option(8, "--experts", help="Number of (identical) experts."),
    top_k: int = typer.Option(2, "--top-k", help="Experts used per token."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random router."),
    force: bool = typer.Option(False, "--force",
                               help="Replace OUT if it exists (only a GGUF file, never the source)."),
) -> None:
    """Turn a dense GGUF into a Mixtral-shaped one with E identical experts."""
    from rich.progress import Progress

    from mlxtral.upcycle import upcycle as do_upcycle

    with Progress(console=err_console, transient=True) as prog:
        task = prog.add_task("upcycling", total=None)
        do_upcycle(src, out, experts=experts, top_k=top_k, seed=seed, force=force,
                   progress=lambda done, total: prog.update(task, completed=done, total=total))
    from mlxtral.wording import plural

    size = out.stat().st_size
    err_console.print(f"wrote {markup_safe(out)} ({size / 1e6:.1f} MB): {plural(experts, 'expert')}, "
                      f"top-{top_k}", highlight=False)


# ---- convert --------------------------------------------------------------------------------------

_CONVERT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32")
# llama.cpp's K-quant mixes (GGUF output only; per-tensor types as llama-quantize: convert/kquant_mix.py)
_KQUANT_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
_TYPE_ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # llama-quantize's


def _convert_type(text: str) -> str | None:
    """A TYPE as llama-quantize takes it: a name (any case, dashes or underscores), one of its
    aliases (Q4_K for Q4_K_M...) or its file-type number (2 for Q4_0, 15 for Q4_K_M...); None if
    unknown."""
    from mlxtral.info import file_type_name

    key = text.strip().lower().replace("-", "_")
    key = _TYPE_ALIASES.get(key, key)
    if key.isascii() and key.isdigit():  # ASCII digits only: '²' is a digit to str.isdigit, not to int()
        key = (file_type_name(int(key)) or "").lower() if len(key) <= 3 else ""  # 15 -> q4_k_m
    return key if key in _CONVERT_TYPES + _KQUANT_MIXES else None


def _mix_option(key: str) -> Any:
    return typer.Option(False, f"--{key}", f"--{key.replace('_', '-')}",
                        help=f"llama.cpp's {key.upper()} K-quant mix (GGUF only).")


@app.command(epilog="Examples:\n\n  mlxtral convert ./Mixtral-8x7B-Instruct-v0.1 mixtral.Q4_0.gguf --q4\n\n"
             "  mlxtral convert model.Q8_0.gguf ./model-mlx --format mlx --q4 --allow-requantize\n\n"
             "  mlxtral convert demo demo.Q4_1.gguf --q4_1 --allow-requantize\n\n"
             "  mlxtral convert ./hf-folder out.gguf --q8 --verify")
@handle_errors
def convert(
    src: str = typer.Argument(..., help="GGUF file or model folder (HF, Mistral original, MLX); "  # noqa: B008
                              "'demo': the built-in demo model."),
    out: Path = typer.Argument(..., help="Output GGUF file or MLX folder."),  # noqa: B008
    type_: str = typer.Argument(None, metavar="[TYPE]", show_default=False,  # noqa: B008
                                help="The output type as llama-quantize takes it (Q4_K_M, Q8_0, F16...), "
                                "in place of its flag."),
    q4: bool = typer.Option(False, "--q4", "--q4_0", "--q4-0",
                            help="4-bit (GGUF Q4_0 / MLX 4-bit); the default."),
    q4_1: bool = typer.Option(False, "--q4_1", "--q4-1", help="4-bit with offsets (GGUF Q4_1)."),
    q5_0: bool = typer.Option(False, "--q5_0", "--q5-0", help="5-bit (GGUF Q5_0)."),
    q5_1: bool = typer.Option(False, "--q5_1", "--q5-1", help="5-bit with offsets (GGUF Q5_1)."),
    q8: bool = typer.Option(False, "--q8", "--q8_0", "--q8-0", help="8-bit (GGUF Q8_0 / MLX 8-bit)."),
    f16: bool = typer.Option(False, "--f16", help="float16."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16."),
    f32: bool = typer.Option(False, "--f32", help="float32."),
    q2_k: bool = _mix_option("q2_k"),
    q3_k_s: bool = _mix_option("q3_k_s"),
    q3_k_m: bool = _mix_option("q3_k_m"),
    q3_k_l: bool = _mix_option("q3_k_l"),
    q4_k_s: bool = _mix_option("q4_k_s"),
    q4_k_m: bool = _mix_option("q4_k_m"),
    q5_k_s: bool = _mix_option("q5_k_s"),
    q5_k_m: bool = _mix_option("q5_k_m"),
    q6_k: bool = _mix_option("q6_k"),
    fmt: str = typer.Option(None, "--format", help="gguf or mlx (default: from OUT's name)."),  # noqa: B008
    group_size: int = typer.Option(None, "--group-size",  # noqa: B008
                                   help="MLX quantization group size (32, 64, 128; default 64)."),
    force: bool = typer.Option(False, "--force",
                               help="Replace OUT if it exists: only a GGUF file or a model folder, never "
                               "the source, a folder holding it, or one with other files."),
    verify: bool = typer.Option(False, "--verify", help="Reload OUT and compare it with SRC."),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize",
        help="Quantize tensors that are already quantized into another type (e.g. Q4_1 -> Q4_0: error on "
        "top of error; refused without this flag, as llama-quantize does)."),
) -> None:
    """Convert a checkpoint to GGUF or an MLX folder, quantizing the big matrices.

    Without a precision flag: --q4 (GGUF Q4_0 with output.weight Q6_K as llama.cpp; MLX 4-bit, groups of 64).
    SRC 'demo' is the built-in demo model."""
    flags = (q4, q4_1, q5_0, q5_1, q8, f16, bf16, f32,
             q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k)
    chosen = [name for name, on in zip(_CONVERT_TYPES + _KQUANT_MIXES, flags, strict=True) if on]
    shown = {"q4_0": "q4", "q8_0": "q8"}  # the flags' first names
    looks_typed = not (str(out).isascii() and str(out).isdigit()) and _convert_type(str(out)) is not None
    if type_ is None and fmt is None and looks_typed and not out.exists():
        # llama-quantize's `IN TYPE` without OUT: not a folder named Q8_0 at Q4_0
        fail(f"convert: OUT {str(out)[:40]!r} is a type's name: give the output path too (mlxtral convert "
             f"IN OUT {str(out)[:40]}); for an MLX folder of that name, add --format mlx", 2)
    if type_ is not None:
        key = _convert_type(type_)
        if key is None:
            known = ", ".join(t.upper() for t in _CONVERT_TYPES + _KQUANT_MIXES)
            fail(f"convert: unknown type {type_[:40]!r} (known: {known}, Q3_K/Q4_K/Q5_K for their _M "
                 "mixes, or llama-quantize's file-type numbers)", 2)
        if fmt is None:  # llama-quantize's form writes GGUF whatever OUT is called
            fmt = "gguf"
        if chosen and chosen != [key]:
            fail(f"choose one output type, got {type_[:40]} and --{shown.get(chosen[0], chosen[0])}", 2)
        chosen = [key]
    if len(chosen) > 1:
        fail(f"choose one output type, got {', '.join('--' + shown.get(c, c) for c in chosen)}", 2)
    if fmt is not None and fmt.lower() not in ("gguf", "mlx"):
        fail(f"--format {fmt}: expected gguf or mlx", 2)
    from mlxtral.convert import convert as do_convert
    from mlxtral.convert import infer_format

    if group_size is not None and infer_format(out, fmt) == "gguf":
        fail("--group-size applies to MLX output only", 2)
    do_convert(resolve_model(src), out, fmt=fmt.lower() if fmt else None, qtype=chosen[0] if chosen else "q4",
               group_size=group_size or 64, force=force, verify=verify, progress=True, console=err_console,
               allow_requantize=allow_requantize)


# ---- entry point ----------------------------------------------------------------------------------


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("mlxtral")
        except PackageNotFoundError:
            v = "unknown"
        sys.stdout.write(f"mlxtral {v}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Run Mixtral-shaped sparse mixture-of-experts models locally."""
    prepare_streams()


def main() -> None:
    prepare_streams()
    import warnings

    # requests (imported by gguf -> mistral_common; mlxtral never uses it) warns at import when its
    # optional charset detector cannot load, e.g. under a low ``ulimit -v``: not the user's concern,
    # and it would make a one-line error three
    warnings.filterwarnings("ignore", module=r"requests(\.|$)")
    from mlxtral.address_space import AddressSpaceError, check_startup, hold_reserve

    try:  # before numba or a model is loaded: below a command's minimum, LLVM and glibc abort
        check_startup(sys.argv[1:])
    except AddressSpaceError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(e.exit_code) from None
    hold_reserve()
    import mlxtral.display  # noqa: F401 - fail()'s one import, loaded while there is memory for it

    _wide_help_when_piped()
    try:
        app(prog_name="mlxtral")
    except Exception as e:  # noqa: BLE001 - reporting a failure failed in its turn
        _last_resort(e)
        raise


def _last_resort(e: BaseException) -> None:
    """When memory ran out and reporting it ran out too (an import, an ``__exit__`` or the line
    itself raising again while unwinding), still one line and exit 1; returns for anything else."""
    from mlxtral.address_space import explain, out_of_memory, release_reserve

    oom = out_of_memory(e)
    if oom is None:
        return
    release_reserve()
    cur: BaseException | None = e
    for _ in range(64):  # the frames the tracebacks hold may be what filled the memory
        if cur is None:
            break
        cur.__traceback__, cur = None, cur.__context__
    why = explain(oom)
    os.write(2, f"error: {why if why is not None else OUT_OF_MEMORY}\n".encode())
    raise SystemExit(1) from None


HELP_WIDTH = 160  # columns of --help written to a pipe or a file (rich's 80 cut option names)


def _wide_help_when_piped() -> None:
    """``mlxtral chat --help | grep`` keeps whole option names: typer lays help out at rich's 80
    columns when stdout is not a terminal, and cuts the names that do not fit."""
    try:
        piped = not sys.stdout.isatty()
    except (AttributeError, ValueError):
        piped = True
    if piped and not os.environ.get("COLUMNS") and not os.environ.get("TERMINAL_WIDTH"):
        import typer.rich_utils

        typer.rich_utils.MAX_WIDTH = HELP_WIDTH


if __name__ == "__main__":
    main()
