"""CI runs the quick quality benchmark and checks that it completes and writes its results (not their numbers)."""

from launch_utils import run_quick_benchmark


def test_quick_quality_benchmark_runs_and_writes_its_json_and_plot(tmp_path):
    record = run_quick_benchmark("quality.py", tmp_path / "quality.json")
    assert set(record["summary"]) == {"rewarded", "thumbs"}
    assert {"start", "sft_all", "sft_top", "dpo", "kto", "alol", "dro"} <= set(record["summary"]["rewarded"])
    assert {"start", "kto", "dro"} <= set(record["summary"]["thumbs"])
    for methods in record["summary"].values():
        for metrics in methods.values():
            assert 0.0 <= metrics["reward"]["mean"] <= 1.0
