"""The precompute cost benchmark's quick run: that it completes, writes its JSON and plot, and that the record is
whole and consistent (every part and phase measured, the row and token counts right, the ratios computed from the
seconds they quote), not its numbers."""

import pytest
from launch_utils import run_quick_benchmark


PARTS = {"forward", "alol", "alol_quarter", "dro", "generation"}
ALOL_PHASES = {"load_model", "tokenise", "value_prompt_rows", "prompt_features", "value_fit", "scoring_pass", "other"}
DRO_PHASES = {"load_model", "tokenise", "reference_pass", "other"}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return run_quick_benchmark("precompute_cost.py", tmp_path_factory.mktemp("precompute") / "precompute_cost.json")


def test_every_part_ran_on_the_right_rows_with_its_memory(record):
    parts, sizes = record["parts"], record["sizes"]
    assert set(parts) == PARTS
    assert "--quick" in record["command"] and record["machine"]["cpu_count"] >= 1
    for name in ("forward", "alol", "dro"):
        assert parts[name]["rows"] == sizes["rows"]
    assert parts["alol_quarter"]["rows"] == sizes["rows"] // 4 == sizes["alol_quarter_rows"]
    # The limit tokenizes as the trainers do: the same tokens
    assert parts["forward"]["tokens"] == parts["alol"]["tokens"] == parts["dro"]["tokens"] > sizes["rows"]
    for name, part in parts.items():
        assert part["seconds"] > 0 and part["rows_per_second"] == pytest.approx(part["rows"] / part["seconds"]), name
        memory = part["memory"]
        assert memory["baseline_mib"] > 0 and memory["peak_increase_mib"] >= 0, name
        assert memory["peak_mib"] == pytest.approx(memory["baseline_mib"] + memory["peak_increase_mib"]), name
    assert record["memory_vs_rows"]["alol_rows"] == [sizes["rows"] // 4, sizes["rows"]]
    assert record["memory_vs_rows"]["alol_peak_increase_mib"] == [
        parts[name]["memory"]["peak_increase_mib"] for name in ("alol_quarter", "alol")
    ]


def test_alol_and_dro_phases_add_up_to_the_constructor(record):
    for name in ("alol", "alol_quarter"):
        alol = record["parts"][name]
        phases = alol["phases"]
        assert set(phases) == ALOL_PHASES
        assert all(phases[key] > 0 for key in ("load_model", "tokenise", "prompt_features", "value_fit"))
        assert phases["scoring_pass"] > 0 and phases["other"] >= 0
        assert sum(phases.values()) == pytest.approx(alol["seconds"])
        value_head = phases["value_prompt_rows"] + phases["prompt_features"] + phases["value_fit"]
        assert alol["value_head_seconds"] == pytest.approx(value_head)
        assert alol["precompute_seconds"] == pytest.approx(value_head + phases["scoring_pass"])
        assert alol["precompute_rows_per_second"] == pytest.approx(alol["rows"] / alol["precompute_seconds"])
        assert 0 < alol["positive_rows"] < alol["rows"]
        assert alol["precompute_metrics"]["value/num_prompts"] == record["sizes"]["value_num_prompts"]
    dro = record["parts"]["dro"]
    assert set(dro["phases"]) == DRO_PHASES
    assert dro["phases"]["reference_pass"] > 0 and dro["phases"]["other"] >= 0
    assert sum(dro["phases"].values()) == pytest.approx(dro["seconds"])


def test_ratios_are_precompute_seconds_over_forward_seconds(record):
    parts, ratios = record["parts"], record["ratios"]
    quoted = {
        "alol_precompute": parts["alol"]["precompute_seconds"],
        "alol_construction": parts["alol"]["seconds"],
        "dro_reference_pass": parts["dro"]["phases"]["reference_pass"],
        "dro_construction": parts["dro"]["seconds"],
    }
    assert set(ratios) == set(quoted)
    for key, ratio in ratios.items():
        assert ratio["precompute_seconds"] == quoted[key], key
        assert ratio["forward_seconds"] == parts["forward"]["seconds"], key
        assert ratio["ratio"] == pytest.approx(ratio["precompute_seconds"] / ratio["forward_seconds"]), key
    assert record["goal"] == {"alol_precompute_at_most": 1.3, "met": ratios["alol_precompute"]["ratio"] <= 1.3}


def test_greedy_generations_are_counted_and_timed_apart(record):
    generation, sizes = record["parts"]["generation"], record["sizes"]
    assert generation["rows"] == 2 * sizes["generation_prompts"]
    assert generation["prompts"] == sizes["generation_prompts"]
    most = sizes["generation_prompts"] * sizes["max_completion_length"]
    assert 0 < generation["generated_tokens"] <= generation["decoded_positions"] <= most
    assert 0 < generation["generation_seconds"] <= generation["value_targets_seconds"] <= generation["seconds"]
    assert generation["tokens_per_second"] == pytest.approx(
        generation["generated_tokens"] / generation["generation_seconds"]
    )
