"""What the trainer tests share: the arguments of a few CPU steps on a tiny model, and a first collated batch."""


def cpu_run_args(output_dir, **overrides) -> dict:
    """Config keyword arguments for a short, quiet CPU run; `overrides` win."""
    return {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-2,
        "seed": 0,
        **overrides,
    }


def first_batch(trainer) -> dict:
    """The first training batch, collated and on the trainer's device."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
