"""Running the recipes as a user does, in a subprocess: one process, or `accelerate launch` on 2 CPU processes; and
the benchmarks' quick runs."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# The DeepSpeed CPU op compiles once (~1 min) and is reused from this cache by every launch
DEEPSPEED_ENV = {
    **OFFLINE_ENV,
    "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/trl_offline/torch_extensions")
    ),
}


def run_recipe(
    script: str,
    *args: str,
    accelerate_config: str | None = None,
    num_processes: int | None = None,
    timeout: int = 900,
    env: dict | None = None,
):
    """`python recipes/<script> args` (or `python <script>` for a path), or the same under `accelerate launch
    --config_file recipes/accelerate_configs/<config>` (on `num_processes` processes instead of the config's), with
    `env` added to the environment; fails the test with the end of stderr unless it exits 0."""
    launcher = [sys.executable]
    if accelerate_config is not None:
        config = f"recipes/accelerate_configs/{accelerate_config}"
        launcher += ["-m", "accelerate.commands.launch", "--config_file", config]
        if num_processes is not None:
            launcher += ["--num_processes", str(num_processes)]
    env = {**(OFFLINE_ENV if accelerate_config is None else DEEPSPEED_ENV), **(env or {})}
    command = [*launcher, script if "/" in script else f"recipes/{script}", *args, "--disable_tqdm", "true"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training completed." in result.stdout
    if "--output_dir" in args:  # the run's own folder tells its processes apart from any other's
        output_dir = args[args.index("--output_dir") + 1]
        assert not processes_running_with(output_dir), f"processes of the run in {output_dir} outlived it"
    return result


def run_quick_benchmark(script: str, output: Path, *arguments: str) -> dict:
    """Runs `benchmarks/<script> --quick --output <output> [arguments]`, checks it exits cleanly and wrote a PNG
    beside its JSON, and returns the JSON record."""
    command = [sys.executable, f"benchmarks/{script}", "--quick", "--output", str(output), *arguments]
    result = subprocess.run(command, cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert output.with_suffix(".png").stat().st_size > 10_000
    return json.loads(output.read_text())


def processes_running_with(argument: str) -> list[int]:
    """Pids of the processes (other than this one) whose command line has `argument`, e.g. a run's output folder."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if argument.encode() in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


def logged_steps(stdout: str) -> list[dict]:
    """The training logs the Trainer prints, one dict per line."""
    return [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'")]
