"""Helpers the benchmark scripts share: one training step as `Trainer` runs it, CPU memory readings, timing summaries,
and the description of the machine a figure came from."""

import os
import platform
import resource
import statistics
import sys

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    """Resident set size now (Linux); elsewhere the peak so far, which can only make an increase look smaller."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def machine(device: str) -> dict:
    """What every recorded figure is labelled with: the machine, the device and the library versions."""
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(trainer, batch: dict) -> float:
    """One optimizer step as `Trainer`'s loop runs it without gradient accumulation, minus callbacks and logging:
    `get_batch_samples`, `training_step` (inputs, forward, loss, metrics, backward), gradient clipping,
    `optimizer.step()`, `lr_scheduler.step()`, `zero_grad()`. Returns the loss."""
    model = trainer.model_wrapped
    batch_samples, num_items_in_batch = trainer.get_batch_samples(iter([dict(batch)]), 1, trainer.args.device)
    loss = trainer.training_step(model, batch_samples[0], num_items_in_batch)
    if trainer.args.max_grad_norm > 0:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss.item()


def tiny_batch(batch: dict, length: int) -> dict:
    """The first row of `batch`, every `(B, T)` tensor cut to `length` positions: a cheap step that creates the
    optimizer state and loads kernels before memory is measured."""
    tiny = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2:
            # per-token reference log-probs are aligned with the T - 1 predicted positions
            value = value[:1, : length - 1 if key.endswith("logps") else length]
        elif torch.is_tensor(value):
            value = value[:1]
        tiny[key] = value
    return tiny


def summary(seconds: list[float]) -> dict:
    """Median and interquartile range of step times."""
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "seconds": seconds}
