"""benchmarks/bench_serve.py's summary over rounds: medians per level, speedups taken within a round."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_serve", Path(__file__).parents[1] / "benchmarks" / "bench_serve.py")
bs = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bs)  # type: ignore[union-attr]


def _row(streams: int, agg: float) -> dict:
    return {"streams": streams, "aggregate_tok_s": agg, "steady_tok_s": agg * 1.1,
            "per_stream_tok_s": agg / streams, "ttft_median_s": 0.1 * streams, "ttft_max_s": 0.2 * streams}


def test_speedup_is_the_median_of_each_rounds_ratio() -> None:
    rounds = [[_row(1, 80.0), _row(8, 160.0)],   # 2.0x
              [_row(1, 100.0), _row(8, 170.0)],  # 1.7x
              [_row(1, 90.0), _row(8, 198.0)]]   # 2.2x
    s = bs.summarize(rounds)
    assert [r["streams"] for r in s] == [1, 8] and s[0]["rounds"] == 3
    assert s[0]["speedup"] == 1.0 and s[1]["speedup"] == 2.0  # the medians' ratio would be 170 / 90
    assert s[1]["aggregate_tok_s"] == 170.0 and s[0]["aggregate_tok_s"] == 90.0


def test_no_single_stream_no_speedup() -> None:
    s = bs.summarize([[_row(2, 90.0), _row(8, 160.0)]])
    assert "speedup" not in s[0] and s[1]["aggregate_tok_s"] == 160.0
