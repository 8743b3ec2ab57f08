"""Prints, as one JSON line, the machine and the libraries a run sees: run by `run.py` in a fresh process with the
search path its parts get, so that the versions and paths recorded are those the tests and benchmarks import.

    python benchmarks/gpu/probe.py cuda

Exits 1 (after printing) when an import fails or the device asked for is not there.
"""

import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys


LIBRARIES = ("torch", "trl", "transformers", "peft", "accelerate", "datasets", "tokenizers", "huggingface_hub")
LIBRARIES += ("safetensors", "pyarrow", "pytest", "matplotlib")


def _library(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # any import error is the finding
        return {"error": f"{type(error).__name__}: {error}"}
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(module, "__version__", None)
    return {"version": version, "path": os.path.dirname(getattr(module, "__file__", "") or "")}


def _nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {}
    query = "--query-gpu=name,driver_version,memory.total"
    done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    name, driver, memory = (part.strip() for part in done.stdout.splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory": memory}


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    record = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "libraries": {name: _library(name) for name in LIBRARIES},
    }
    errors = [f"{name}: {lib['error']}" for name, lib in record["libraries"].items() if "error" in lib]
    try:
        import trl_offline
        from trl_offline import ALoLTrainer, DROTrainer, IQLearnTrainer  # noqa: F401

        record["trl_offline"] = {"version": trl_offline.__version__, "path": os.path.dirname(trl_offline.__file__)}
    except Exception as error:
        errors.append(f"trl_offline: {type(error).__name__}: {error}")
    if "error" not in record["libraries"]["torch"]:
        import torch

        record["torch_cuda"] = torch.version.cuda
        record["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            record["gpu"] = {
                "name": properties.name,
                "count": torch.cuda.device_count(),
                "memory_gib": properties.total_memory / 2**30,
                "capability": f"{properties.major}.{properties.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "cudnn": torch.backends.cudnn.version(),
                "nvidia_smi": _nvidia_smi(),
            }
        if device.startswith("cuda") and not torch.cuda.is_available():
            errors.append("CUDA is not available to torch: run with --device cpu, or on a GPU machine")
    record["errors"] = errors
    print(json.dumps(record))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
