"""Model cards for the trainers, written the way TRL's trainers write them: on every checkpoint, and also when the
user calls `save_model`, so that a folder saved by hand carries its card too."""

import os
import shutil


def model_card_name(args) -> str:
    """The model's name in its card: the hub id's last part if there is one, else the output folder's name."""
    hub_id = args.hub_model_id
    return hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.normpath(args.output_dir))


def write_model_card(trainer, output_dir: str | None) -> None:
    """Writes the card into `args.output_dir` (where TRL puts it) and copies it into `output_dir` if that differs.
    Call on the main process only."""
    trainer.create_model_card(model_name=model_card_name(trainer.args))
    target, card = output_dir or trainer.args.output_dir, os.path.join(trainer.args.output_dir, "README.md")
    if os.path.abspath(target) != os.path.abspath(trainer.args.output_dir) and os.path.isfile(card):
        shutil.copyfile(card, os.path.join(target, "README.md"))
