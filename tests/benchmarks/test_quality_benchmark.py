"""CI runs the quick quality benchmark and checks that it completes and writes its results (not their numbers)."""

import subprocess
import sys

import pytest
from launch_utils import OFFLINE_ENV, ROOT, run_quick_benchmark


sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import answer_kind  # noqa: E402


def test_quick_quality_benchmark_runs_and_writes_its_json_and_plot(tmp_path):
    record = run_quick_benchmark("quality.py", tmp_path / "quality.json")
    assert set(record["summary"]) == {"rewarded", "thumbs"}
    assert {"start", "sft_all", "sft_top", "dpo", "kto", "alol", "dro"} <= set(record["summary"]["rewarded"])
    assert {"start", "kto", "dro"} <= set(record["summary"]["thumbs"])
    for methods in record["summary"].values():
        for metrics in methods.values():
            assert 0.0 <= metrics["reward"]["mean"] <= 1.0


def test_quality_benchmark_trains_only_the_chosen_methods_with_the_config_and_tokenizer_given(tmp_path):
    from trl_offline.offline_kit import BPE_VOCAB_SIZE

    record = run_quick_benchmark(
        "quality.py",
        tmp_path / "dro.json",
        *("--tasks", "rewarded", "--methods", "dro", "--config", '{"beta": 0.05}', "--tokenizer", "bpe"),
    )
    assert record["runs"]["rewarded"]["0"]["start"]["vocabulary"] == BPE_VOCAB_SIZE  # the byte-level BPE's
    assert set(record["summary"]) == {"rewarded"}
    assert set(record["summary"]["rewarded"]) == {"start", "dro"}
    assert record["runs"]["rewarded"]["0"]["dro"]["config"] == {"beta": 0.05}  # as the trainer ran it
    for run in record["runs"]["rewarded"]["0"].values():  # every greedy answer counted once, by its kind
        assert sum(run["answer_kinds"].values()) == pytest.approx(1.0)
        assert run["answer_kinds"]["expert"] == run["expert_share"]


def test_answer_kinds_name_the_behaviour_datas_answers():
    assert [answer_kind("dcab", a) for a in ("abcd", "dcab", "dcba", "abce", "abc", "badc")] == [
        "expert", "unsorted", "reversed", "changed", "other", "other"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--methods", "drO"), "invalid choice: 'drO'"),
        (("--tasks", "thumbs", "--methods", "dpo"), "--methods dpo is not a method of --tasks thumbs"),
        (("--config", "[1]"), "--config must be a JSON object"),
    ],
)
def test_quality_benchmark_refuses_methods_and_configs_it_cannot_run(arguments, message):
    command = [sys.executable, "benchmarks/quality.py", "--quick", *arguments]
    result = subprocess.run(command, cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
