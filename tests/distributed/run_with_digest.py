"""Runs `trl_offline/scripts/<trainer>.py` as `accelerate launch` would, and before the process group goes, prints on
every rank a digest of the model's full weights (gathered under ZeRO-3): `WEIGHT_DIGEST rank=<r> <sha256>`.

    accelerate launch --config_file ... tests/distributed/run_with_digest.py dro --config ... (the script's arguments)
"""

import hashlib
import importlib
import os
import sys

import trl_offline.scripts.common as common


def weight_digest(trainer) -> str:
    import deepspeed

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    parameters = list(model.named_parameters())
    sharded = any(hasattr(p, "ds_id") for _, p in parameters)
    gathered = deepspeed.zero.GatheredParameters([p for _, p in parameters]) if sharded else _nothing()
    digest = hashlib.sha256()
    with gathered:
        for name, parameter in parameters:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train_and_save(trainer, script_args, training_args):
    end = trainer.end

    def end_after_digest():
        line = f"WEIGHT_DIGEST rank={trainer.accelerator.process_index} {weight_digest(trainer)}\n"
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks' lines never interleave
        end()

    trainer.end = end_after_digest
    original_train_and_save(trainer, script_args, training_args)


original_train_and_save = common.train_and_save
common.train_and_save = train_and_save  # before the script imports it

if __name__ == "__main__":
    script = importlib.import_module(f"trl_offline.scripts.{sys.argv[1]}")
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(fail_with_unknown_args=False)
    script.main(script_args, training_args, model_args)
