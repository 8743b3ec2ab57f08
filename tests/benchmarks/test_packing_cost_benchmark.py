"""The packing cost benchmark's quick run: that it completes, writes its JSON and plot, and that the record is whole
and consistent (every trainer timed on its own batches, tokens per second computed from the tokens and seconds it
quotes, packed batches fuller than padded ones), not its numbers."""

import pytest
from launch_utils import run_quick_benchmark


TRAINERS = {"sft_packed", "iqlearn_packed", "iqlearn_padded", "sft_padded"}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return run_quick_benchmark("packing_cost.py", tmp_path_factory.mktemp("packing") / "packing_cost.json")


def test_every_trainer_is_timed_and_its_tokens_per_second_follow_from_its_figures(record):
    results, steps = record["results"], record["sizes"]["steps"]
    assert set(results) == TRAINERS and "--quick" in record["command"]
    for name, result in results.items():
        assert len(result["seconds"]) == steps and result["seconds_total"] == pytest.approx(sum(result["seconds"]))
        assert result["tokens_per_second"] == pytest.approx(result["real_tokens"] / result["seconds_total"]), name
        assert 0 < result["completion_tokens"] < result["real_tokens"], name
    # SFT and IQLearn were checked to collate the same batches, so they count the same tokens
    for kind in ("packed", "padded"):
        assert results[f"sft_{kind}"]["real_tokens"] == results[f"iqlearn_{kind}"]["real_tokens"]
    # A packed step holds (nearly) full rows of seq_len tokens; a padded step holds batch_size rows of varied length
    sizes = record["sizes"]
    capacity = steps * sizes["batch_size"] * sizes["seq_len"]
    assert results["iqlearn_padded"]["real_tokens"] < results["iqlearn_packed"]["real_tokens"] <= capacity


def test_ratios_are_the_quoted_tokens_per_second(record):
    results, ratios = record["results"], record["ratios"]
    speed = {name: result["tokens_per_second"] for name, result in results.items()}
    assert ratios["iqlearn_packed_over_sft_packed"] == pytest.approx(speed["iqlearn_packed"] / speed["sft_packed"])
    assert ratios["iqlearn_packed_over_iqlearn_padded"] == pytest.approx(
        speed["iqlearn_packed"] / speed["iqlearn_padded"]
    )
    assert ratios["sft_packed_over_sft_padded"] == pytest.approx(speed["sft_packed"] / speed["sft_padded"])
