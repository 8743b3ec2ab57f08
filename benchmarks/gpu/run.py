"""One command that proves every trainer on a CUDA GPU in bf16 and takes the cost figures there.

    python benchmarks/gpu/run.py --out DIR --wheels .whl      # on a one-GPU H100/H200 machine, under 8 minutes
    python benchmarks/gpu/run.py --device cpu --quick --out /tmp/gpu_out   # the same script on a CPU (CI), tiny

Run from the repository root; trl_offline need not be installed. The parts, in order, each recorded with its
status, command, seconds and log tail, a failed part not stopping the ones after it:

1. `environment`: what is importable at the versions needed (pyproject.toml's ranges, transformers at our tested
   version), installing what is missing from the `--wheels` folder into a folder under /tmp that goes first on
   `PYTHONPATH` (the repository root after it); then the machine and the versions every later part sees. If
   something is still missing, the run stops here and says what (see README.md beside this file for the wheels).
2. `tests`: `pytest -q -m gpu tests/gpu` with `TRL_OFFLINE_TEST_DEVICE=<device>`, its counts from the JUnit XML.
3. `iqlearn_cost`, `offline_cost`: the cost scripts at Qwen3-0.6B's shape (`costs.py` says how, and how the batches
   were sized), IQLearn vs SFT, A-LoL vs SFT (its precompute timed apart), DRO with each value network vs KTO.
4. The summary: `run.json` (machine, versions, command, each part, the issue's targets: IQLearn <= 1.05x SFT's step
   time and <= 1.02x its peak memory increase, A-LoL <= 1.10x SFT's step time, DRO (each value network) <= 1.00x
   KTO's) and `summary.md`, printed too.

Everything lands in `--out`, at most 8 files and no folder: run.json, summary.md, run.log (all that was printed),
tests.log, iqlearn_cost.{json,png}, offline_cost.{json,png}. Scratch goes under /tmp. Each part has a timeout taken
from the run's budget (`--budget-s`), so one hang cannot eat the others' time. The exit status is 0 when every
part was ok (whatever the targets' verdicts), 1 otherwise.
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import correctness
import costs
import environment
import summary
from part_runner import TAIL_CHARS, Budget, run_command


ROOT = Path(__file__).resolve().parents[2]
PARTS = ("tests", "iqlearn_cost", "offline_cost")
# Each part's share of the budget, in seconds; a part also gets what the ones before it left unused
CAPS = {"environment": 60, "tests": 120, "iqlearn_cost": 100, "offline_cost": 180}
MIN_TIMEOUT_S = 10  # a part with less left is skipped


class RunLog:
    """Prints each line and appends it to `run.log`; keeps the lines for the parts' log tails."""

    def __init__(self, path: Path):
        self.file = open(path, "w")
        self.lines = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()
        self.lines.append(line)

    def tail_since(self, start: int) -> str:
        return "\n".join(self.lines[start:])[-TAIL_CHARS:]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the results (at most 8 files)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (implied on the CPU)")
    parser.add_argument("--wheels", help="folder of wheels to install what is missing from (README.md)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--tests-path", default="tests/gpu", help="what pytest runs with -m gpu")
    parser.add_argument("--budget-s", type=float, default=460, help="wall-clock budget of the whole run")
    parser.add_argument("--iqlearn-batch", type=int, help="rows per step of iqlearn_cost (default: costs.py)")
    parser.add_argument("--offline-batch", type=int, help="rows per step of offline_cost (default: costs.py)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.device == "cpu" and not args.quick:
        print("--device cpu: the quick sizes (a real model's shape would take hours on a CPU)")
        args.quick = True
    return args


def subprocess_env(site: Path | None, device: str) -> dict:
    """What every part runs with: the installed wheels, then the repository root, first on the search path; no hub;
    unbuffered output; no progress bars."""
    paths = ([str(site)] if site else []) + [str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        correctness.DEVICE_VARIABLE: device,
    }


def environment_part(args, budget: Budget, scratch: Path, log) -> tuple[dict, dict | None, dict]:
    """Returns the part's record, the machine (None if the probe failed) and the environment of later parts."""
    tic, start = time.perf_counter(), len(log.lines)
    site = scratch / "site"
    wheels = Path(args.wheels).resolve() if args.wheels else None
    findings = environment.prepare(ROOT, wheels, site, log)
    env = subprocess_env(site if findings["wheels_installed"] else None, args.device)
    part = {
        "command": "requirement check"
        + (f"; pip install --no-index --no-deps --target {site} <wheels from {wheels}>" if wheels else ""),
        **{key: findings[key] for key in ("wheels_installed", "unmet", "warnings")},
        "pythonpath": env["PYTHONPATH"],
    }
    machine = None
    if not findings["ok"]:
        log(f"environment: {findings['message']}")
        part.update(status="failed", message=findings["message"])
    else:
        probe = [sys.executable, "benchmarks/gpu/probe.py", args.device]
        part["command"] += f"; {shlex.join(probe)}"
        outcome = run_command(
            probe, env=env, timeout_s=budget.timeout_for("environment"), log=log, prefix="[probe]", cwd=str(ROOT)
        )
        lines = outcome.output.strip().splitlines()
        try:
            machine = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            machine = None
        if outcome.returncode == 0 and machine is not None:
            part["status"] = "ok"
        else:
            errors = machine["errors"] if machine else [outcome.tail(500)]
            part.update(status="timeout" if outcome.timed_out else "failed", message="; ".join(errors))
    part.update(seconds=time.perf_counter() - tic, log_tail=log.tail_since(start))
    return part, machine, env


def tests_part(args, timeout_s: float, env: dict, scratch: Path, out: Path, log) -> dict:
    junit = scratch / "tests.xml"
    command = correctness.pytest_command(args.tests_path, junit)
    outcome = run_command(command, env=env, timeout_s=timeout_s, log=log, prefix="[tests]", cwd=str(ROOT))
    (out / "tests.log").write_text(outcome.output)
    found = correctness.counts(junit, outcome.output)
    return {
        "status": correctness.status(outcome.returncode, found),
        "command": f"{correctness.DEVICE_VARIABLE}={args.device} {shlex.join(command)}",
        "seconds": outcome.seconds,
        "timeout_s": timeout_s,
        "returncode": outcome.returncode,
        "counts": found,
        "log": "tests.log",
        "log_tail": outcome.tail(),
    }


def cost_part(name: str, args, timeout_s: float, env: dict, out: Path, log) -> dict:
    batch = args.iqlearn_batch if name == "iqlearn_cost" else args.offline_batch
    command = costs.command(name, device=args.device, quick=args.quick, out=out, batch_size=batch)
    outcome = run_command(command, env=env, timeout_s=timeout_s, log=log, prefix=f"[{name}]", cwd=str(ROOT))
    part = {
        "command": shlex.join(command),
        "seconds": outcome.seconds,
        "timeout_s": timeout_s,
        "returncode": outcome.returncode,
        "log_tail": outcome.tail(),
    }
    if outcome.timed_out:
        return {"status": "timeout", **part}
    if outcome.returncode != 0 or not (out / f"{name}.json").exists():
        return {"status": "failed", **part}
    return {"status": "ok", **part, "result": costs.read_result(name, out)}


def write_record(record: dict, out: Path) -> None:
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    tic = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="trl_offline_gpu_run_"))
    log = RunLog(out / "run.log")
    budget = Budget(args.budget_s, {name: CAPS[name] for name in ("environment", *args.parts)})
    record = {
        "benchmark": "trl_offline on one device: the GPU tests and the cost of every trainer in bf16",
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "quick": args.quick,
        "machine": None,
        "parts": {},
        "targets": [],
        "seconds": 0.0,
    }
    log(f"run.py: {record['command']} (scratch {scratch}, budget {args.budget_s:.0f} s)")
    part, record["machine"], env = environment_part(args, budget, scratch, log)
    record["parts"]["environment"] = part
    write_record(record, out)
    for name in args.parts:
        timeout_s = budget.timeout_for(name)
        if record["parts"]["environment"]["status"] != "ok":
            part = {"status": "skipped", "message": "the environment part failed", "seconds": 0.0}
        elif timeout_s < MIN_TIMEOUT_S:
            part = {"status": "skipped", "message": f"budget spent ({timeout_s:.0f} s left)", "seconds": 0.0}
        elif name == "tests":
            part = tests_part(args, timeout_s, env, scratch, out, log)
        else:
            part = cost_part(name, args, timeout_s, env, out, log)
        log(f"part {name}: {part['status']} ({part['seconds']:.0f} s)")
        record["parts"][name] = part
        write_record(record, out)
    results = {name: p["result"] for name, p in record["parts"].items() if "result" in p}
    record["targets"] = costs.issue_targets(results)
    record["seconds"] = time.perf_counter() - tic
    write_record(record, out)
    text = summary.markdown(record)
    (out / "summary.md").write_text(text)
    log(text)
    log(f"wrote {len(list(out.iterdir()))} files to {out}")
    return 0 if all(p["status"] == "ok" for p in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
