"""The precompute of A-LoL and DRO gives every row the same numbers on any number of processes.

`dump_precompute.py` builds both trainers on 31 training and 11 evaluation rows (lengths that no process count here
divides) from a pretrained start, with `reward_funcs` (rows scored across processes, by a function for A-LoL, whose
value targets come from the reference's greedy answers, and by a reward model for DRO), and writes every row's reward, reference log-probabilities, value and advantage, and the
rows A-LoL keeps. One process is the reference; DDP on 2, 3 and 4 processes and ZeRO-3 on 3 must match it row for row.
Tolerance: 1e-4 relative (reductions add in another order; measured differences are below 1e-6).
"""

import json
import math
import socket
import subprocess
import sys

import pytest
from launch_utils import DEEPSPEED_ENV, ROOT


HARNESS = "tests/distributed/dump_precompute.py"
RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dump(model_path: str, reward_model_path: str, output, backend: str | None = None, num_processes: int = 1) -> dict:
    launcher = [sys.executable]
    if backend is not None:
        launcher += [
            "-m", "accelerate.commands.launch",
            "--config_file", f"recipes/accelerate_configs/{backend}.yaml",
            "--num_processes", str(num_processes),
            "--main_process_port", str(_free_port()),
        ]  # fmt: skip
    command = [*launcher, HARNESS, model_path, reward_model_path, str(output)]
    result = subprocess.run(command, cwd=ROOT, env=DEEPSPEED_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    dumped = json.loads(output.read_text())
    assert dumped["num_processes"] == num_processes
    return dumped


@pytest.fixture(scope="module")
def one_process(pretrained_tiny_model_path, reward_model_path, tmp_path_factory) -> dict:
    return _dump(pretrained_tiny_model_path, reward_model_path, tmp_path_factory.mktemp("one") / "rows.json")


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}[{key}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=RTOL, abs=1e-6), where
    else:
        assert got == want, where


def test_one_process_precompute_is_not_trivial(one_process):
    # Values and advantages that vary from row to row, and rows on both sides of A = 0: a shift by one row shows
    alol = one_process["alol"]["train"]
    assert len({round(v, 4) for v in alol["value"]}) > 5
    assert 0 < len(one_process["alol"]["positive_rows"]) < len(alol["advantage"])
    assert 0 < one_process["alol"]["value_metrics"]["value/target_mean"] < 1


@pytest.mark.parametrize("backend,num_processes", [("ddp_cpu", 2), ("ddp_cpu", 3), ("ddp_cpu", 4), ("zero3_cpu", 3)])
def test_every_row_gets_the_numbers_one_process_gives_it(
    tmp_path, pretrained_tiny_model_path, reward_model_path, one_process, backend, num_processes
):
    dumped = _dump(pretrained_tiny_model_path, reward_model_path, tmp_path / "rows.json", backend, num_processes)
    for trainer in ("alol", "dro"):
        for split in ("train", "eval"):
            for column, want in one_process[trainer][split].items():
                _assert_close(dumped[trainer][split][column], want, f"{trainer} {split} {column}")
    assert dumped["alol"]["positive_rows"] == one_process["alol"]["positive_rows"]
    _assert_close(dumped["alol"]["value_metrics"], one_process["alol"]["value_metrics"], "value fit")
    _assert_close(dumped["dro"]["reward_statistics"], one_process["dro"]["reward_statistics"], "reward statistics")
