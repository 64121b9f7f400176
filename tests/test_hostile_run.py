"""The hostile-input run (tests/hostile_run.py) in CI: every attack of issue 16 through the real
command line, plus a mutation fuzz of the tokenizer side files, ends with 0 hangs, 0 tracebacks,
0 unclear errors, 0 data loss, 0 control tokens from user text and 0 raw escapes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hostile_run  # noqa: E402


def test_hostile_run_has_no_findings() -> None:
    res = hostile_run.run_all(fuzz=int(os.environ.get("MLXTRAL_HOSTILE_FUZZ", "40")), progress=False)
    print(f"\nhostile-input run: {res['cases']} cases, {res['counts']}")
    findings = "\n".join(f"{f['verdict']}: {f['name']}: {f['detail']}" for f in res["findings"])
    assert not res["findings"], findings
    assert res["cases"] >= 40
