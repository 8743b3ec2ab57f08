"""What the tests share: the arguments of a few CPU steps on a tiny model, a first collated batch, and a tiny
model pretrained on the task (a pretrained start)."""


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


def pretrain_tiny_model(root, tokenizer: str = "char", steps: int = 150, batch_size: int = 32) -> str:
    """A tiny Llama with the kit's `tokenizer`, first trained with TRL's `SFTTrainer` for `steps` steps of
    `batch_size` on the kit's sorting answers of mixed quality (a pretrained start, as users fine-tune one), saved
    under `root`; returns its folder."""
    from trl import SFTConfig, SFTTrainer

    from trl_offline.offline_kit import build_tiny_model, make_scored_dataset

    config = SFTConfig(
        output_dir=str(root / "sft"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=3e-3,
        warmup_steps=min(10, steps // 6),
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    rows = make_scored_dataset("prompt_completion", min(1024, steps * batch_size), seed=123, score="none")
    trainer = SFTTrainer(build_tiny_model(str(root / "base"), tokenizer=tokenizer), args=config, train_dataset=rows)
    trainer.train()
    trainer.save_model()
    return config.output_dir
