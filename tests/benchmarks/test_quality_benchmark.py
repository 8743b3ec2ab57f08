"""CI runs the quick quality benchmark and checks that it completes and writes its results (not their numbers)."""

import json
import subprocess
import sys

from launch_utils import OFFLINE_ENV, ROOT


def test_quick_quality_benchmark_runs_and_writes_its_json_and_plot(tmp_path):
    output = tmp_path / "quality.json"
    command = [sys.executable, "benchmarks/quality.py", "--quick", "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(output.read_text())
    assert set(record["summary"]) == {"rewarded", "thumbs"}
    assert {"start", "sft_all", "sft_top", "dpo", "kto", "alol", "dro"} <= set(record["summary"]["rewarded"])
    assert {"start", "kto", "dro"} <= set(record["summary"]["thumbs"])
    for methods in record["summary"].values():
        for metrics in methods.values():
            assert 0.0 <= metrics["reward"]["mean"] <= 1.0
    assert output.with_suffix(".png").stat().st_size > 10_000
