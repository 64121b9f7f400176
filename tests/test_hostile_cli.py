"""The command line, the sampling parameters and the environment against a careless or hostile user
(issue 16): llama.cpp's short flags, every float flag finite and in range (CLI and Python API), seeds,
thread counts (flag, API, the pool's control block), every environment variable we read, closed
standard streams and ASCII terminals, tables written to a pipe, ``--help`` of every command, counts
in messages, and the process's peak memory on both backends. Tiny random GGUFs written here."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import mlx_available, random_weights, tiny_args, write_gguf  # noqa: E402

from mlxtral.cli import app  # noqa: E402
from mlxtral.errors import UsageError  # noqa: E402

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "mlxtral"
COMMANDS = ("chat", "generate", "info", "bench", "upcycle", "convert")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile_cli")
    a, a16 = tiny_args(), tiny_args(n_experts=16)
    deep = d / ("a_folder_name_long_enough_that_no_80_column_table_could_hold_it_" + "x" * 40)
    deep.mkdir()
    return {
        "moe": write_gguf(d / "tiny_moe.gguf", random_weights(a, 1), a),
        "moe16": write_gguf(d / "tiny_moe16.gguf", random_weights(a16, 2), a16),
        "deep": write_gguf(deep / "tiny_model_under_a_long_path.gguf", random_weights(a, 1), a),
    }


@pytest.fixture
def restore_threads():
    """Tests that change the kernels' thread count put the default back."""
    from mlxtral.backends import default_threads, kernels

    yield kernels
    kernels.set_num_threads(default_threads())


def run(*args: Any, input: str | bytes | None = None, env: dict[str, str | None] | None = None):  # noqa: A002
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def one_line_error(result: Any, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def script(*args: Any, env: dict[str, str] | None = None, input: bytes | None = None,  # noqa: A002
           close: tuple[int, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed console script; ``close``: descriptors closed in the child (``<&-``, ``>&-``,
    ``2>&-``)."""
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"

    def pre() -> None:
        for fd in close:
            os.close(fd)

    return subprocess.run([str(SCRIPT), *map(str, args)], input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=pre if close else None)


def script_error(p: subprocess.CompletedProcess, code: int) -> str:
    err = p.stderr.decode(errors="replace")
    assert p.returncode == code, (p.returncode, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---- 1. short flags mean what they mean in llama.cpp --------------------------------------------------

# llama-cli / llama-bench: -t threads, -p prompt (bench: prompt tokens), -n tokens to predict (bench:
# tokens to generate), -c context size, -s seed, -r repetitions (bench), -sys system prompt, -f the
# prompt's file (perplexity: the text's), -a alias (llama-server), -h help, -o output format (bench).
LLAMA_SHORT = {"-t": {"threads"}, "-p": {"prompt", "n_prompt"}, "-n": {"max_tokens", "n_gen"},
               "-c": {"max_context"}, "-s": {"seed"}, "-r": {"repeats"}, "-sys": {"system"}, "-h": {"help"},
               "-f": {"prompt_file", "text_file"}, "-a": {"alias"}, "-e": {"escape"}, "-m": {"model_opt"},
               "-o": {"output"}}


def _short_flags(cmd_name: str) -> dict[str, str]:
    import typer.main

    group = typer.main.get_command(app)
    cmd = group.commands[cmd_name]  # type: ignore[attr-defined]
    out = {}
    for p in cmd.params:
        for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
            if opt.startswith("-") and not opt.startswith("--"):
                out[opt] = p.name
    return out


@pytest.mark.parametrize("cmd", ["chat", "generate", "info", "bench", "convert", "upcycle"])
def test_short_flags_mean_what_they_mean_in_llamacpp(cmd: str) -> None:
    shorts = _short_flags(cmd)
    for opt, name in shorts.items():
        assert opt in LLAMA_SHORT and name in LLAMA_SHORT[opt], (cmd, opt, name)
    if cmd not in ("info", "convert", "upcycle"):
        assert shorts.get("-t") == "threads"
    assert "-b" not in shorts  # llama.cpp: batch size
    if cmd not in ("convert", "upcycle"):  # llama.cpp's -m, mlx-lm's --model: the model
        assert shorts.get("-m") == "model_opt"


def test_t_is_threads_and_temperature_is_temp_only(models: dict[str, Path], restore_threads: Any) -> None:
    """``generate m -p ... -t 1`` runs on one thread and stays greedy (it sampled at temperature 1)."""
    import mlxtral

    r = run("generate", models["moe"], "-p", "Hello there", "-n", "8", "-t", "1", "--json")
    assert r.exit_code == 0, r.output
    assert restore_threads.get_num_threads() == 1
    greedy = mlxtral.load(models["moe"]).generate("Hello there", max_tokens=8)
    assert json.loads(r.stdout)["text"] == greedy
    r = run("generate", models["moe"], "-p", "Hello", "-n", "2", "--temp", "0", "-s", "5", "-c", "64",
            "-sys", "Be brief.", "--chat", "--json")
    assert r.exit_code == 0, r.output
    assert run("generate", models["moe"], "-p", "Hi", "-b", "numpy").exit_code == 2  # no -b
    assert run("generate", models["moe"], "-p", "Hi", "-m", "1GB").exit_code == 2  # -m is the model: twice


@pytest.mark.parametrize("cmd", ["generate", "chat", "bench", "serve", "info", "perplexity", "convert"])
@pytest.mark.parametrize("word", ["-ngl", "-fa", "-cnv", "-no-cnv", "-tb", "-xyz"])
def test_llamacpp_multi_letter_flags_are_refused_by_name(cmd: str, word: str) -> None:
    """click reads ``-ngl 99`` as ``-n gl`` and ``-fa`` as ``-f a``: the error named the wrong flag."""
    r = run(cmd, "model.gguf", *(["out.gguf"] if cmd == "convert" else []), word, "2")
    assert r.exit_code == 2, r.output
    assert f"No such option: {word}" in one_line_error(r, 2)


def test_a_dash_word_as_a_value_is_still_a_value(models: dict[str, Path]) -> None:
    r = run("generate", models["moe"], "-p", "-hello", "-n", "2", "--json")  # the prompt "-hello"
    assert r.exit_code == 0, r.output
    assert run("generate", models["moe"], "-p", "Hi", "-sys", "-be-brief", "-n", "2", "--json").exit_code == 0
    r = run("generate", models["moe"], "-p", "Hi", "-n", "2", "--", "-ngl")  # after --: an argument
    assert r.exit_code == 2 and "unexpected extra argument" in r.output, r.output


@pytest.mark.parametrize("flag", ["-m", "--model"])
def test_the_model_as_llamacpp_and_mlx_lm_give_it(models: dict[str, Path], flag: str) -> None:
    """``-m MODEL`` (llama-cli) and ``--model MODEL`` (mlx_lm.generate) in place of MODEL: the same
    run; both, or neither where the model has no default, is one line and exit 2."""
    plain = run("generate", models["moe"], "-p", "Hello there", "-n", "6", "--json")
    flagged = run("generate", flag, models["moe"], "-p", "Hello there", "-n", "6", "--json")
    assert plain.exit_code == flagged.exit_code == 0, flagged.output
    assert json.loads(flagged.stdout)["text"] == json.loads(plain.stdout)["text"]
    assert run("info", flag, models["moe"], "--json").exit_code == 0
    for cmd in ("generate", "info", "bench"):
        r = run(cmd, "-p", "8") if cmd != "info" else run(cmd)
        assert r.exit_code == 2 and "missing the model: give MODEL or -m MODEL" in r.output, r.output
    r = run("info", models["moe"], flag, models["moe"])
    assert r.exit_code == 2 and "the model is given twice" in r.output, r.output


# ---- 2. sampling parameters: finite and in range ------------------------------------------------------

BAD_SAMPLING = [
    ("--temp", "nan"), ("--temp", "inf"), ("--temp", "-inf"), ("--temp", "-1"), ("--temp", "101"),
    ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "inf"),
    ("--min-p", "nan"), ("--min-p", "-0.1"), ("--min-p", "1"), ("--min-p", "inf"),
    ("--repeat-penalty", "nan"), ("--repeat-penalty", "1e-300"), ("--repeat-penalty", "0"),
    ("--repeat-penalty", "-1"), ("--repeat-penalty", "inf"), ("--repeat-penalty", "11"),
    ("--top-k", "-1"), ("--seed", "-2"), ("--seed", str(2**64)), ("--seed", "9" * 40),
    ("--max-tokens", "-2"),
]


@pytest.mark.parametrize("cmd", ["generate", "chat"])
@pytest.mark.parametrize("flag,value", BAD_SAMPLING)
def test_bad_sampling_flag_is_one_line(models: dict[str, Path], cmd: str, flag: str, value: str) -> None:
    args = ["-p", "Hi"] if cmd == "generate" else []
    err = one_line_error(run(cmd, models["moe"], *args, "-n", "2", flag, value, input="Hi\n"), 2)
    assert flag in err and len(err) < 200, err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "1e300"])
def test_bench_bandwidth_must_be_finite(models: dict[str, Path], value: str) -> None:
    r = run("bench", models["moe"], "-p", "4", "-n", "2", "-r", "1", "--bandwidth", value)
    err = one_line_error(r, 2)
    assert "--bandwidth" in err


def test_seed_minus_one_is_random_and_the_largest_seed_works(models: dict[str, Path]) -> None:
    for seed in ("-1", str(2**64 - 1)):
        r = run("generate", models["moe"], "-p", "Hi", "-n", "3", "--temp", "1", "--seed", seed, "--json")
        assert r.exit_code == 0, r.output
    a, b = (run("generate", models["moe"], "-p", "Hi", "-n", "4", "--temp", "1", "-s", str(2**64 - 1),
                "--json") for _ in range(2))
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


BAD_PARAMS = [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-0.5),
              dict(temperature=1e9), dict(temperature="0.7"), dict(top_p=float("nan")), dict(top_p=0.0),
              dict(min_p=float("nan")), dict(min_p=1.0), dict(repetition_penalty=1e-300),
              dict(repetition_penalty=float("nan")), dict(repetition_penalty=0.0),
              dict(repetition_penalty=20.0), dict(top_k=-1), dict(top_k=2.5), dict(top_k=True), dict(seed=-2),
              dict(seed=2**64), dict(seed=1.5), dict(seed="1"), dict(repetition_context=-1),
              dict(temperature=10**400), dict(top_p=-(10**400))]


@pytest.mark.parametrize("kw", BAD_PARAMS, ids=[repr(k) for k in BAD_PARAMS])
def test_sampling_params_refuse_with_usage_error(kw: dict[str, Any]) -> None:
    from mlxtral.sampling import SamplingParams

    with pytest.raises(UsageError) as e:
        SamplingParams(**kw)
    assert next(iter(kw)) in str(e.value) and len(str(e.value)) < 200


def test_sampling_params_normalize() -> None:
    from mlxtral.sampling import SamplingParams

    assert SamplingParams(seed=-1).seed is None  # llama.cpp's random seed
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(seed=np.int64(3)).seed == 3
    assert SamplingParams(temperature=np.float32(0.5)).temperature == 0.5
    assert SamplingParams(temperature=1e-300).temperature == 0.0  # greedy
    assert SamplingParams(repetition_penalty=0.5).repetition_penalty == 0.5
    assert SamplingParams(repetition_penalty=10).repetition_penalty == 10.0


def test_tiny_temperatures_never_give_nan() -> None:
    """A temperature of 1e-300 overflowed the scaled logits (NaN probabilities); 1e-5 .. 1e-3 with
    logits far apart must still draw the top token, without a warning."""
    from mlxtral.sampling import Sampler, SamplingParams

    x = np.array([1e30, -1e30, 0.0, 0.99e30], dtype=np.float32)  # 1e30 / 1e-300 is inf: inf - inf, NaN
    for t in (1e-300, 1e-30, 1e-6, 1e-5, 1e-4, 1e-3):
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            assert Sampler(SamplingParams(temperature=t, seed=0))(x) == 0


def test_api_stream_checks_every_parameter(models: dict[str, Path]) -> None:
    import mlxtral

    m = mlxtral.load(models["moe"])
    for kw in ({"temperature": float("nan")}, {"repetition_penalty": 1e-300}, {"seed": -7},
               {"max_tokens": 2.5}, {"max_tokens": -1}, {"prefill_chunk": 0}, {"stop": ["x" * 5000]},
               {"stop": ["s"] * 500}, {"stop": [3]}):
        with pytest.raises(UsageError):
            m.generate("Hi", **{"max_tokens": 2, **kw})
    assert isinstance(m.generate("Hi", max_tokens=2, seed=-1, temperature=1.0), str)


def test_stop_flag_is_bounded(models: dict[str, Path]) -> None:
    err = one_line_error(run("generate", models["moe"], "-p", "Hi", "--stop", "y" * 100_000), 2)
    assert "--stop" in err and len(err) < 200


def test_chat_seed_steps_stay_in_range(models: dict[str, Path]) -> None:
    """Each chat turn draws with seed + turn: -1 stays random on every turn, 2**64 - 1 wraps to 0."""
    import io

    import mlxtral
    from mlxtral.chat import ChatLoop, SamplingOptions

    m = mlxtral.load(models["moe"])
    seeds: list[Any] = []
    real = m.stream

    def stream(*a: Any, **kw: Any) -> Any:
        seeds.append(kw["seed"])
        return real(*a, **kw)

    m.stream = stream  # type: ignore[method-assign]
    for seed, want in ((-1, [-1, -1]), (2**64 - 1, [2**64 - 1, 0])):
        seeds.clear()
        loop = ChatLoop(m, SamplingOptions(max_tokens=2, temperature=1.0, seed=seed), out=io.StringIO(),
                        err=io.StringIO())
        loop.run(["Hi", "Again"])
        assert seeds == want


@pytest.mark.parametrize("kv", ["int8", "bfloat16", "banana", "complex64"])
def test_kv_dtype_is_checked(models: dict[str, Path], kv: str) -> None:
    import mlxtral
    from mlxtral.errors import UsageError

    with pytest.raises(UsageError, match="float32 or float16"):
        mlxtral.load(models["moe"], backend="numpy", kv_dtype=kv)


def test_generated_text_cannot_drive_a_terminal(models: dict[str, Path]) -> None:
    """A vocabulary's token (or piped input echoed back) holding ESC/OSC sequences reaches a
    terminal as visible escapes; a pipe gets the text unchanged."""
    import io
    from types import SimpleNamespace

    import mlxtral
    from mlxtral.chat import ChatLoop, SamplingOptions
    from mlxtral.display import text_safe

    evil = "hi\x1b]52;c;cm0gLXJm\x07\x1b[2J\u202e\r done\n\tok \U0001f468\u200d\U0001f469"
    assert text_safe(evil) == ("hi\\x1b]52;c;cm0gLXJm\\x07\\x1b[2J\\u202e\\x0d done\n\tok "
                               "\U0001f468\u200d\U0001f469")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    m = mlxtral.load(models["moe"])
    real = m.stream

    def stream(*a: Any, **kw: Any) -> Any:
        for r in real(*a, **kw):
            yield SimpleNamespace(**{**vars(r), "text": evil}) if r.text else r

    m.stream = stream  # type: ignore[method-assign]
    for cls, raw in ((Tty, False), (io.StringIO, True)):
        out, err = cls(), cls()
        ChatLoop(m, SamplingOptions(max_tokens=2, temperature=0.0), out=out, err=err, echo=True).run([evil])
        assert ("\x1b" in out.getvalue() + err.getvalue()) == raw
        assert "\U0001f468\u200d\U0001f469" in out.getvalue()


# ---- 3. threads: bounded, and the pool can never write past its control block ------------------------


@pytest.mark.parametrize("value", ["0", "-3", "257", "99999999999999999999"])
@pytest.mark.parametrize("cmd", ["generate", "chat", "bench"])
def test_threads_flag_is_bounded(models: dict[str, Path], cmd: str, value: str) -> None:
    args = ["-p", "Hi"] if cmd == "generate" else []
    err = one_line_error(run(cmd, models["moe"], *args, "-t", value, input="Hi\n"), 2)
    assert "--threads" in err and "256" in err and len(err) < 200


@pytest.mark.parametrize("cmd", ["chat", "generate", "bench"])
def test_threads_help_states_the_cap(cmd: str) -> None:
    import typer.main

    cmd_obj = typer.main.get_command(app).commands[cmd]  # type: ignore[attr-defined]
    threads = next(p for p in cmd_obj.params if p.name == "threads")
    assert "-t" in threads.opts and "at most 256" in threads.help
    assert run(cmd, "--help").exit_code == 0


@pytest.mark.parametrize("n", [0, -1, 257, 10**20, 2.5, True, "4"])
def test_set_num_threads_refuses_out_of_range(n: Any, restore_threads: Any) -> None:
    with pytest.raises(UsageError):
        restore_threads.set_num_threads(n)


def test_set_num_threads_in_range(restore_threads: Any) -> None:
    restore_threads.set_num_threads(1)
    assert restore_threads.get_num_threads() == 1
    x = np.ones((1, 64), np.float32)
    from mlxtral.qtensor import QTensor

    w = QTensor.from_float(np.eye(64, dtype=np.float32))
    np.testing.assert_allclose(restore_threads.linear(x, w), x, atol=1e-6)


def test_pool_never_has_more_workers_than_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool asked for 1000 threads (bypassing set_num_threads) starts at most 255 workers, and
    waking it touches only the block's own sleep flags (IndexError past 256 before)."""
    from mlxtral.backends import kernels

    if not kernels.HAVE_NUMBA:
        pytest.skip("numba kernels not in use")

    class NoThread:
        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def join(self, timeout: float | None = None) -> None:
            pass

    monkeypatch.setattr(kernels.threading, "Thread", NoThread)
    pool = kernels._Pool(1000)
    assert pool.n_workers <= kernels._nb.MAX_WORKERS and pool.n_workers == kernels.MAX_THREADS - 1
    flags = pool.ctl[kernels._nb.CTL_SLEEP:kernels._nb.CTL_SLEEP + pool.n_workers]
    flags[:] = 1  # every worker asleep
    pool.wake()
    assert not flags.any()


@pytest.mark.parametrize("wid", ["last+1", "last+100", "-1"])
def test_worker_with_no_flag_never_writes_past_the_block(wid: str) -> None:
    """A worker id without a sleep flag quits at once: no atomic store lands past the control block
    (the words right after it stay 0) or on another field."""
    from mlxtral.backends import kernels

    if not kernels.HAVE_NUMBA:
        pytest.skip("numba kernels not in use")
    nb = kernels._nb
    w = {"last+1": nb.MAX_WORKERS, "last+100": nb.MAX_WORKERS + 99, "-1": -1}[wid]
    big = np.zeros(nb.CTL_SIZE + 256, dtype=np.int64)
    ctl = big[: nb.CTL_SIZE]
    assert nb.worker_loop(ctl, w, 0) == 1
    assert not big.any()


# ---- 4. environment variables: checked, one line naming the variable ---------------------------------

_ENV_CHILD = r"""
import json, os, sys
cases = json.loads(sys.argv[1])
from mlxtral.errors import UsageError
out = []
for name, value in cases:
    for m in [m for m in sys.modules if m == "mlxtral.backends" or m.startswith("mlxtral.backends.")]:
        del sys.modules[m]
    os.environ[name] = value
    try:
        import mlxtral.backends.kernels as k
        k.get_num_threads()
        out.append("accepted")
    except UsageError as e:
        out.append(str(e))
    del os.environ[name]
print(json.dumps(out))
"""

BAD_ENV = [
    ("MLXTRAL_SPIN_MS", "abc"), ("MLXTRAL_SPIN_MS", "-1"), ("MLXTRAL_SPIN_MS", "1e300"),
    ("MLXTRAL_SPIN_MS", "nan"), ("MLXTRAL_SPIN_MS", "inf"), ("MLXTRAL_CHUNK_KB_MAX", "9" * 5000),
    ("MLXTRAL_CHUNK_KB_MAX", "0"),
    ("MLXTRAL_CHUNK_KB_MAX", "x"), ("MLXTRAL_CHUNKS_PER_THREAD", "0"), ("MLXTRAL_CHUNKS_PER_THREAD", "1e3"),
    ("MLXTRAL_EXACT_KERNELS", "2"), ("MLXTRAL_EXACT_KERNELS", "maybe"), ("MLXTRAL_NO_NUMBA", "perhaps"),
    ("MLXTRAL_NO_AVX2", "yes please"), ("NUMBA_NUM_THREADS", "257"), ("MLXTRAL_SPIN_MS", "\x1b[31mred"),
]


def test_bad_environment_variables_are_one_line_naming_them() -> None:
    """Every variable the kernels read, each in a fresh import: a UsageError naming it, cut short,
    terminal-safe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXTRAL_")}
    r = subprocess.run([sys.executable, "-c", _ENV_CHILD, json.dumps(BAD_ENV)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for (name, value), msg in zip(BAD_ENV, json.loads(r.stdout), strict=True):
        assert msg.startswith(f"{name}="), (name, value, msg)
        assert "expected" in msg and len(msg) < 160 and "\x1b" not in msg, msg


@pytest.mark.parametrize("value", ["0", "-1", "abc", "99999999999", "1.5", ""])
def test_numba_num_threads_is_checked_before_numba_is_imported(value: str) -> None:
    code = ("import sys\nfrom mlxtral.errors import UsageError\ntry:\n    import mlxtral.backends\n"
            "    print('accepted', 'numba' in sys.modules)\nexcept UsageError as e:\n"
            "    print('refused', 'numba' in sys.modules, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NUMBA_NUM_THREADS": value})
    assert r.returncode == 0, r.stderr[-2000:]
    if value == "":  # unset: the default
        assert r.stdout.startswith("accepted False"), r.stdout
    else:
        assert r.stdout.startswith("refused False NUMBA_NUM_THREADS="), r.stdout


def test_numba_num_threads_through_the_command_line(models: dict[str, Path]) -> None:
    p = script("generate", models["moe"], "-p", "Hi", "-n", "1", env={"NUMBA_NUM_THREADS": "0"})
    err = script_error(p, 2)
    assert err.startswith("error: NUMBA_NUM_THREADS=0: expected a whole number of threads from 1 to 256"), err
    p = script("generate", models["moe"], "-p", "Hi", "-n", "1", env={"MLXTRAL_SPIN_MS": "nan"})
    err = script_error(p, 2)
    assert "MLXTRAL_SPIN_MS=nan" in err


@pytest.mark.parametrize("value", ["auto", "AUTO", "numpy", " numpy "])
def test_mlxtral_backend_auto_resolves(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from mlxtral.model import resolve_backend

    monkeypatch.setenv("MLXTRAL_BACKEND", value)
    assert resolve_backend("auto") in ("numpy", "mlx")  # auto was a RecursionError


@pytest.mark.parametrize("value", ["cuda", "auto auto", "x" * 10_000, "\x1b]0;pwned\x07"])
def test_mlxtral_backend_bad_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from mlxtral.model import resolve_backend

    monkeypatch.setenv("MLXTRAL_BACKEND", value)
    with pytest.raises(UsageError) as e:
        resolve_backend("auto")
    msg = str(e.value)
    assert msg.startswith("MLXTRAL_BACKEND=") and len(msg) < 160 and "\x1b" not in msg and "\x07" not in msg


def test_mlxtral_backend_through_the_command_line(models: dict[str, Path]) -> None:
    r = run("generate", models["moe"], "-p", "Hi", "-n", "1", env={"MLXTRAL_BACKEND": "auto"})
    assert r.exit_code == 0, r.output
    r = run("generate", models["moe"], "-p", "Hi", "-n", "1", env={"MLXTRAL_BACKEND": "tpu"})
    err = one_line_error(r, 2)
    assert "MLXTRAL_BACKEND=tpu" in err


def test_llamacpp_python_variable_must_name_an_interpreter(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    from mlxtral.bench import find_llamacpp_python

    monkeypatch.setenv("MLXTRAL_LLAMACPP_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(UsageError, match="MLXTRAL_LLAMACPP_PYTHON="):
        find_llamacpp_python()
    monkeypatch.setenv("MLXTRAL_LLAMACPP_PYTHON", "/" + "p" * 100_000)  # longer than any path
    with pytest.raises(UsageError) as e:
        find_llamacpp_python()
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("value", ["0", "-1", "two", "257", "100000000000000000000"])
def test_convert_threads_variable_is_bounded(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """MLXTRAL_CONVERT_THREADS=10**20 started that many conversion threads."""
    from mlxtral.convert import tensors

    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", value)
    with pytest.raises(UsageError, match="MLXTRAL_CONVERT_THREADS="):
        tensors.convert_threads()
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "256")
    assert tensors.convert_threads() == 256


@pytest.mark.parametrize("name", ["MLXTRAL_CACHE", "XDG_CACHE_HOME"])
def test_cache_variables_are_bounded(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from mlxtral.demo import cache_dir

    monkeypatch.delenv("MLXTRAL_CACHE", raising=False)
    monkeypatch.setenv(name, "/" + "c" * 100_000)  # no file system takes this name
    with pytest.raises(UsageError) as e:
        cache_dir()
    assert str(e.value).startswith(f"{name}=") and len(str(e.value)) < 200


def test_env_readers() -> None:
    from mlxtral import env

    os.environ.pop("MLXTRAL_TEST_VAR", None)
    assert env.env_int("MLXTRAL_TEST_VAR", 7, 1, 9) == 7 and env.env_flag("MLXTRAL_TEST_VAR") is False
    for value, want in (("3", 3), (" +4 ", 4), ("", 7)):
        os.environ["MLXTRAL_TEST_VAR"] = value
        assert env.env_int("MLXTRAL_TEST_VAR", 7, 1, 9) == want
    for value in ("0", "10", "３", "1e3", "0x3", "3.0", "9" * 5000, "-1"):
        os.environ["MLXTRAL_TEST_VAR"] = value
        with pytest.raises(UsageError, match="MLXTRAL_TEST_VAR="):
            env.env_int("MLXTRAL_TEST_VAR", 7, 1, 9)
    for value, want in (("1", True), ("YES", True), ("on", True), ("0", False), ("off", False),
                        ("No", False)):
        os.environ["MLXTRAL_TEST_VAR"] = value
        assert env.env_flag("MLXTRAL_TEST_VAR") is want
    os.environ.pop("MLXTRAL_TEST_VAR")


# ---- 5. closed standard streams, an ASCII terminal ----------------------------------------------------


def test_chat_with_stdin_closed(models: dict[str, Path]) -> None:
    p = script("chat", models["moe"], "-n", "2", close=(0,))
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert b"Traceback" not in p.stderr


@pytest.mark.parametrize("cmd", ["generate", "chat", "info"])
def test_stdout_closed_is_one_line(models: dict[str, Path], cmd: str) -> None:
    args = ["-p", "Hi", "-n", "2"] if cmd == "generate" else ["-n", "2"] if cmd == "chat" else []
    err = script_error(script(cmd, models["moe"], *args, input=b"Hi\n", close=(1,)), 1)
    assert err == "error: stdout is closed: there is nowhere to write the output"


def test_stderr_closed_still_answers(models: dict[str, Path]) -> None:
    p = script("generate", models["moe"], "-p", "Hello", "-n", "3", "--temp", "0", close=(2,))
    assert p.returncode == 0 and p.stdout.strip()


def test_stdout_and_stderr_closed_exit_quietly(models: dict[str, Path]) -> None:
    p = script("generate", models["moe"], "-p", "Hello", "-n", "3", close=(1, 2))
    assert p.returncode == 1


def test_ascii_output_gets_replacements(models: dict[str, Path]) -> None:
    """PYTHONIOENCODING=ascii: streamed text (temperature 100: most of the 32000 pieces are not ASCII),
    the chat and --json never raise UnicodeEncodeError."""
    ascii_env = {"PYTHONIOENCODING": "ascii"}
    p = script("generate", models["moe"], "-p", "héllo wörld", "-n", "60", "--temp", "100", "--seed", "1",
               env=ascii_env)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr.decode()[-2000:]
    p.stdout.decode("ascii")
    p = script("chat", models["moe"], "-n", "30", "--temp", "100", "--seed", "1",
               input="héllo 世界\n".encode(), env=ascii_env)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr.decode()[-2000:]
    p = script("generate", models["moe"], "-p", "héllo wörld", "-n", "20", "--temp", "100", "--seed", "2",
               "--json", env=ascii_env)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert json.loads(p.stdout.decode("ascii"))["prompt"] == "héllo wörld"


# ---- 6. tables in a pipe, --help, counts ------------------------------------------------------------


def test_info_table_is_not_cut_in_a_pipe(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run("info", models["deep"])
    assert r.exit_code == 0, r.output
    assert any(str(models["deep"]) in ln for ln in r.stdout.splitlines()), r.stdout


def test_expert_heatmap_is_not_cut_in_a_pipe(models: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run("generate", models["moe16"], "-p", "Hello", "-n", "2", "--expert-stats")
    assert r.exit_code == 0, r.output
    header = [ln for ln in r.stderr.splitlines() if "e0" in ln]
    assert header and "e15" in header[0] and "bal." in header[0], r.stderr
    assert "…" not in r.stderr


def test_bench_lines_are_not_cut_in_a_pipe(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run("bench", models["moe"], "-p", "4", "-n", "2", "-r", "1", "--bandwidth", "10")
    assert r.exit_code == 0, r.output
    assert any("peak memory" in ln and "decode ceiling" in ln for ln in r.stdout.splitlines()), r.stdout
    assert "…" not in r.stdout


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_shows_no_type_after_plain_flags(cmd: str | None) -> None:
    r = run(*([cmd] if cmd else []), "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout and "--help" in r.stdout
    if cmd in ("generate", "bench", "info"):
        assert "--json" in r.stdout


def test_counts_read_right(models: dict[str, Path]) -> None:
    from mlxtral.wording import plural

    assert [plural(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]
    assert plural(1, "entry") == "1 entry" and plural(3, "entry") == "3 entries"
    r = run("generate", models["moe"], "-p", "Hi", "-n", "1")
    assert r.exit_code == 0, r.output
    assert "generation: 1 token," in r.stderr and "1 tokens" not in r.stderr
    r = run("chat", models["moe"], "-n", "1", "--temp", "0", input="Hi\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "conversation: 1 turn," in r.stderr and "1 turns" not in r.stderr
    from mlxtral.generate import GenerationStats

    s = GenerationStats(prompt_tokens=1, generation_tokens=1).summary()
    assert "prompt: 1 token," in s and "generation: 1 token," in s
    two = GenerationStats(prompt_tokens=2, generation_tokens=2).summary()
    assert re.search(r"\b1 (tokens|turns)\b", two) is None and "2 tokens" in two


# ---- 7. peak memory is the process's, on both backends ----------------------------------------------


def _vm_hwm() -> int:
    from mlxtral.rss import peak_rss

    return peak_rss()


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_peak_memory_is_the_process_peak(models: dict[str, Path], backend: str) -> None:
    import mlxtral

    if backend == "mlx" and not mlx_available():
        pytest.skip("mlx not installed")
    m = mlxtral.load(models["moe"], backend=backend)
    before = _vm_hwm()
    *_, last = m.stream("Hello", max_tokens=2)
    assert last.stats.peak_memory >= before  # VmHWM never goes down: at least what we had before
    assert m.backend.peak_memory() >= before


def test_vm_hwm_is_read_on_linux() -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc")
    hwm = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM:"))
    assert abs(_vm_hwm() - hwm) < (64 << 20)


@pytest.mark.skipif(not mlx_available(), reason="mlx not installed")
def test_bench_json_peak_is_the_process_peak_on_mlx(models: dict[str, Path]) -> None:
    before = _vm_hwm()
    r = run("bench", models["moe"], "-p", "4", "-n", "2", "-r", "1", "--bandwidth", "10", "--json",
            "--backend", "mlx")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["peak_memory_bytes"] >= before


# ---- 8. (tests/test_interrupt.py) a child never inherits an ignored SIGHUP from nohup ------------------


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_children_of_the_signal_tests_get_default_sighup() -> None:
    from test_interrupt import _default_signals

    code = "import signal; print(signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)"
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           preexec_fn=_default_signals)
    finally:
        signal.signal(signal.SIGHUP, old)
    assert r.stdout.strip() == "True", r.stderr


# ---- wrong arguments: one line, not a framed block -----------------------------------------------------


@pytest.mark.parametrize("argv", [["generate"], ["nosuch"], ["bench", "x", "-r", "0"],
                                  ["generate", "x", "-p", "hi", "-n", "abc"], ["info", "x", "--nope"],
                                  ["chat", "--max-context", "0"], ["convert", "a"]])
def test_wrong_arguments_are_one_line(argv: list[str]) -> None:
    err = one_line_error(run(*argv), 2)
    assert "--help" in err and "\u2500" not in err and "\u256d" not in err
    err = script_error(script(*argv), 2)
    assert "--help" in err


def test_no_arguments_still_show_the_help() -> None:
    r = run()
    assert "Usage" in r.output and "Traceback" not in r.output
