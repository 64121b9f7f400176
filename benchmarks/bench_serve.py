#!/usr/bin/env python3
"""`mlxtral serve` under load: aggregate generated tok/s and time to first token (TTFT) at
1, 2, 4, 8 concurrent streaming clients.

    python benchmarks/bench_serve.py                    # the demo model
    python benchmarks/bench_serve.py MODEL.gguf --tokens 32 --streams 1 2 4 8 --backend numpy
    python benchmarks/bench_serve.py --url http://127.0.0.1:8080   # a server already running
    python benchmarks/bench_serve.py MODEL.gguf --prefill-chunk 256  # the server's prompt tokens per step

Starts the server itself (a subprocess on a free port) unless --url is given. Every client sends a
different greedy completion request (distinct prompts, so the prompt cache does not help) with
``max_tokens`` fixed and no stop, so each stream generates exactly that many tokens. Reported per
level: wall time, aggregate generated tok/s (all streams' tokens / wall time), per-stream tok/s,
TTFT median and max (request sent -> first text chunk), and the steady-state decode rate (text
chunks, about one token each, of all streams while every stream is past its first token and none
has ended, per second). A warm-up request runs first. ``--rounds N`` runs the levels N times,
alternating, and reports medians, the speedup as the median of each round's own ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any


def start(model: str | None, backend: str, parallel: int, ctx: int, threads: int | None,
          prefill_chunk: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "mlxtral.cli", "serve", *([model] if model else []), "--port", "0",
           "--backend", backend, "--parallel", str(parallel), "-c", str(ctx), "--prompt-cache", "0"]
    if threads:
        cmd += ["-t", str(threads)]
    if prefill_chunk:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline().decode()
        if not line:
            raise SystemExit(f"the server did not start (exit {proc.wait()})")
        sys.stderr.write(line)
        if " on http://" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.rsplit(" on ", 1)[1].strip()


def one(client: Any, prompt: str, tokens: int, out: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    first = None
    n = 0
    stamps = []  # arrival time of each text chunk (about one token each)
    for c in client.completions.create(model="m", prompt=prompt, max_tokens=tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True}):
        if c.choices and c.choices[0].text:
            stamps.append(time.perf_counter())
            first = first or stamps[-1]
        if c.usage is not None:
            n = c.usage.completion_tokens
    t1 = time.perf_counter()
    out.append({"ttft": (first or t1) - t0, "tokens": n, "time": t1 - t0, "stamps": stamps, "end": t1})


def level(client: Any, streams: int, tokens: int, prompt_words: int) -> dict[str, Any]:
    res: list[dict[str, float]] = []
    base = " ".join(["lorem"] * prompt_words)
    threads = [threading.Thread(target=one, args=(client, f"Request {i}: {base}", tokens, res))
               for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in res)
    ttfts = [r["ttft"] for r in res]
    # steady state: the window where every stream has its first token and none has ended
    w0 = max(r["stamps"][0] for r in res if r["stamps"])
    w1 = min(r["end"] for r in res)
    inside = sum(1 for r in res for s in r["stamps"] if w0 < s <= w1)
    steady = round(inside / (w1 - w0), 2) if w1 > w0 and inside else None
    return {"streams": streams, "wall_s": round(wall, 3), "tokens": total,
            "aggregate_tok_s": round(total / wall, 2), "steady_tok_s": steady,
            "per_stream_tok_s": round(statistics.mean(r["tokens"] / r["time"] for r in res), 2),
            "ttft_median_s": round(statistics.median(ttfts), 3), "ttft_max_s": round(max(ttfts), 3)}


def summarize(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per level, the median over rounds of each figure, and (when 1 stream was measured) the
    median of each round's aggregate tok/s over that round's single stream: one stream's rate
    moves most from run to run here, so a ratio is taken within a round, never across."""
    out = []
    for i, first in enumerate(rounds[0]):
        rs = [rows[i] for rows in rounds]
        row: dict[str, Any] = {"streams": first["streams"], "rounds": len(rs)}
        for key in ("aggregate_tok_s", "steady_tok_s", "per_stream_tok_s", "ttft_median_s", "ttft_max_s"):
            row[key] = round(statistics.median(r[key] for r in rs), 3)
        if rounds[0][0]["streams"] == 1:
            row["speedup"] = round(statistics.median(rows[i]["aggregate_tok_s"] / rows[0]["aggregate_tok_s"]
                                                     for rows in rounds), 3)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model file (default: the demo model)")
    ap.add_argument("--url", help="a running server's base URL (…/v1); the model argument is then unused")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=32, help="tokens each stream generates")
    ap.add_argument("--prompt-words", type=int, default=20)
    ap.add_argument("-c", "--max-context", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--prefill-chunk", type=int, help="the server's --prefill-chunk (default: its own)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every level this many times, alternating; report medians (ratios per round)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import openai

    proc = None
    url = a.url
    if url is None:
        proc, url = start(a.model, a.backend, max(a.streams), a.max_context, a.threads, a.prefill_chunk)
    try:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        one(client, "warm up", 4, [])
        rounds = []
        for k in range(max(1, a.rounds)):
            rows = []
            for n in a.streams:
                r = level(client, n, a.tokens, a.prompt_words)
                rows.append(r)
                print(json.dumps({"round": k, **r}), flush=True)
            rounds.append(rows)
        summary = summarize(rounds)
        for r in summary:
            print(json.dumps(r), flush=True)
        if summary and "speedup" in summary[0]:
            print("speedup over 1 stream (median of the rounds' ratios): "
                  + ", ".join(f"{r['streams']}: {r['speedup']:.2f}x" for r in summary))
        if a.json:
            with open(a.json, "w") as f:
                out = {"model": a.model or "demo", "url": url, "tokens": a.tokens, "rounds": rounds,
                       "summary": summary}
                json.dump(out, f, indent=1)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
