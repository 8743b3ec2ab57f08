"""The one-command GPU run (`benchmarks/gpu/run.py`), in CI on the CPU with `--quick`: that every part runs, and that
its record is whole and consistent (the tests counted, every trainer timed, tokens per second and the ratios
computed from the figures they quote, the output folder within what a device machine gives back), not its numbers.
And its environment check: what it finds missing, and which wheel it takes to mend it."""

import importlib.util
import json
import re
import subprocess
import sys
import zipfile

import pytest
from launch_utils import OFFLINE_ENV, ROOT

from trl_offline.dro.config import VALUE_NETWORKS


PARTS = {"environment", "tests", "iqlearn_cost", "offline_cost"}
FILES = {"run.json", "summary.md", "run.log", "tests.log"}
FILES |= {f"{name}.{ext}" for name in ("iqlearn_cost", "offline_cost") for ext in ("json", "png")}
TRAINERS = {
    "iqlearn_cost": {"sft", "iqlearn"},
    "offline_cost": {"sft", "alol", "kto", "dro", "dro_policy_head", "kto_lora", "dro_adapter"},
}
# Each DRO value network's trainer in the offline cost run, and the KTO it is compared with
DRO_TRAINERS = {
    "separate": ("dro", "kto"),
    "policy_head": ("dro_policy_head", "kto"),
    "adapter": ("dro_adapter", "kto_lora"),
}
STEP_TIME_TARGETS = {"iqlearn_vs_sft_step_time": 1.05, "alol_vs_sft_step_time": 1.10}
STEP_TIME_TARGETS |= {f"dro_{network}_vs_{kto}_step_time": 1.0 for network, (_, kto) in DRO_TRAINERS.items()}


def _load_environment_module():
    """`benchmarks/gpu/environment.py` under a name of its own (its folder is no package)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_run_environment", ROOT / "benchmarks" / "gpu" / "environment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    command = [sys.executable, "benchmarks/gpu/run.py", "--device", "cpu", "--quick", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def record(out):
    return json.loads((out / "run.json").read_text())


def test_every_part_ran_ok_with_its_command_and_log(record):
    assert set(record["parts"]) == PARTS
    assert "--quick" in record["command"] and record["device"] == "cpu" and record["quick"] is True
    for name, part in record["parts"].items():
        assert part["status"] == "ok", (name, part.get("message"), part.get("log_tail"))
        assert part["command"] and part["seconds"] > 0 and part["log_tail"], name
    assert record["seconds"] >= sum(part["seconds"] for part in record["parts"].values())
    machine = record["machine"]
    assert machine["cuda_available"] is False and machine["errors"] == []
    for library in ("torch", "trl", "transformers", "peft", "accelerate", "datasets"):
        assert machine["libraries"][library]["version"], library
    # trl_offline is imported from this checkout, through PYTHONPATH, as on a machine where it is not installed
    assert machine["trl_offline"]["path"] == str(ROOT / "trl_offline")
    assert str(ROOT) in record["parts"]["environment"]["pythonpath"].split(":")


def test_the_gpu_tests_ran_on_the_cpu_and_were_counted(out, record):
    tests = record["parts"]["tests"]
    counts = tests["counts"]
    assert counts["source"] == "junit"
    assert counts["passed"] > 0 and counts["failed"] == 0 and counts["errors"] == 0
    assert counts["passed"] + counts["failed"] + counts["errors"] + counts["skipped"] == counts["total"]
    assert "TRL_OFFLINE_TEST_DEVICE=cpu" in tests["command"] and "-m gpu tests/gpu" in tests["command"]
    assert f"{counts['passed']} passed" in (out / "tests.log").read_text()


@pytest.mark.parametrize("part", sorted(TRAINERS))
def test_every_trainer_is_timed_with_its_tokens_per_second(out, record, part):
    quoted = record["parts"][part]["result"]
    script = json.loads((out / f"{part}.json").read_text())
    assert set(quoted["trainers"]) == set(script["results"]) == TRAINERS[part]
    sizes = script["sizes"]
    # The quick shape keeps the preset's features: grouped key-value heads, a head size apart, tied embeddings
    assert sizes["kv_heads"] < sizes["heads"] and sizes["head_dim"] != sizes["hidden"] // sizes["heads"]
    assert sizes["tie_word_embeddings"] and script["config"]["bf16"]
    for name, figures in quoted["trainers"].items():
        result = script["results"][name]
        assert figures["median_s"] == result["median_s"] > 0 and all(s > 0 for s in result["step_seconds"])
        assert len(result["step_seconds"]) == sizes["steps"]
        assert figures["tokens_per_step"] == sizes["batch_size"] * sizes["seq_len"]
        assert figures["tokens_per_second"] == pytest.approx(figures["tokens_per_step"] / figures["median_s"])
        # No memory on the CPU in the quick run (--no-cpu-memory): no figure rather than a wrong one
        assert figures["peak_increase_mib"] is None and figures["peak_mib"] is None
    estimate = quoted["memory_estimate"]
    assert set(estimate["persistent_gib"]) == TRAINERS[part] and estimate["peak_gib"] > 0
    assert quoted["measured_peak_gib"] is None  # measured on CUDA only


def test_every_dro_value_network_is_costed_against_kto():
    assert set(DRO_TRAINERS) == set(VALUE_NETWORKS)
    assert {dro for dro, _ in DRO_TRAINERS.values()} <= TRAINERS["offline_cost"]


def test_alol_precompute_is_timed_apart_in_rows_per_second(out):
    precompute = json.loads((out / "offline_cost.json").read_text())["alol_precompute"]
    assert precompute["extra_seconds"] == pytest.approx(precompute["seconds"]["alol"] - precompute["seconds"]["sft"])
    assert precompute["rows_per_second"] == pytest.approx(precompute["rows"] / precompute["extra_seconds"])


def test_targets_are_ratios_of_the_figures_they_quote(record):
    targets = {t["target"]: t for t in record["targets"]}
    assert set(targets) == set(STEP_TIME_TARGETS) | {"iqlearn_vs_sft_peak_memory_increase"}
    for key, at_most in STEP_TIME_TARGETS.items():
        target = targets[key]
        trainers = record["parts"][target["result"]]["result"]["trainers"]
        assert target["at_most"] == at_most and target["figure"] == "median_s"
        assert target["value"] == trainers[target["trainer"]]["median_s"]
        assert target["baseline_value"] == trainers[target["baseline"]]["median_s"]
        assert target["ratio"] == pytest.approx(target["value"] / target["baseline_value"])
        assert target["met"] == (target["ratio"] <= at_most)
    memory = targets["iqlearn_vs_sft_peak_memory_increase"]
    assert memory["at_most"] == 1.02 and memory["ratio"] is None and memory["met"] is None  # not measured on CPU


def test_the_output_folder_is_what_a_device_machine_gives_back(out):
    entries = list(out.iterdir())
    assert {entry.name for entry in entries} == FILES
    assert len(entries) <= 8 and all(entry.is_file() for entry in entries)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", entry.name) for entry in entries)
    assert all(entry.stat().st_size < 16 * 2**20 for entry in entries)


def test_the_summary_names_every_part_and_target(out, record):
    text = (out / "summary.md").read_text()
    assert text in (out / "run.log").read_text()  # printed too
    for name in PARTS:
        assert f"| {name} | ok |" in text
    for target in record["targets"]:
        assert f"| {target['target']} |" in text


def _wheel(folder, name: str, version: str, requires: list[str]):
    """A wheel with only its metadata: enough for the environment check to read its name, version and needs."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def test_the_environment_check_names_what_is_missing_and_where_to_get_it(tmp_path):
    environment = _load_environment_module()
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = [\n    "torch>=2.6",\n    "trlofflineabsent>=1",\n]\n'
    )
    findings = environment.prepare(tmp_path, None, tmp_path / "site", log=lambda line: None)
    assert not findings["ok"] and findings["wheels_installed"] == []
    assert findings["unmet"] == ["trlofflineabsent>=1 (required by pyproject.toml): missing"]
    assert "run with --wheels DIR" in findings["message"] and environment.README in findings["message"]


def test_the_newest_wheel_whose_own_needs_can_be_met_is_chosen(tmp_path):
    environment = _load_environment_module()
    _wheel(tmp_path, "trlofflineabsent", "3.0", ["trlofflineabsentdep>=1"])  # its need is nowhere
    _wheel(tmp_path, "trlofflineabsent", "2.0", ["torch>=2"])
    _wheel(tmp_path, "trlofflineabsent", "1.0", [])
    check = environment.check([(environment.Requirement("trlofflineabsent>=1.5"), "test")])
    assert [u.describe() for u in check.fatal] == ["trlofflineabsent>=1.5 (required by test): missing"]
    chosen = environment.choose_wheels(check, environment.read_wheels(tmp_path))
    assert [(w.name, str(w.version)) for w in chosen] == [("trlofflineabsent", "2.0")]
