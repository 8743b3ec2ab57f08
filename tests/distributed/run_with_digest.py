"""Runs `trl_offline/scripts/<trainer>.py` as `accelerate launch` would, and before the process group goes, prints on
every rank a digest of the model's full weights (gathered under ZeRO-3): `WEIGHT_DIGEST rank=<r> <sha256>`.

    accelerate launch --config_file ... tests/distributed/run_with_digest.py dro --config ... (the script's arguments)
"""

import hashlib
import importlib
import os
import sys

import trl_offline.scripts.common as common


if os.environ.get("TRL_OFFLINE_TEST_CPU_FSDP"):
    from cpu_fsdp import enable_fsdp_on_cpu

    enable_fsdp_on_cpu()


def weight_digest(trainer) -> str:
    import deepspeed
    from torch.distributed.tensor import DTensor

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    parameters = list(model.named_parameters())
    sharded = any(hasattr(p, "ds_id") for _, p in parameters)
    gathered = deepspeed.zero.GatheredParameters([p for _, p in parameters]) if sharded else _nothing()
    digest = hashlib.sha256()
    with gathered:
        for name, parameter in parameters:
            parameter = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter  # FSDP2's shards
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
        if trainer.is_fsdp_enabled:  # and the parameters are FSDP2's shards
            from torch.distributed.tensor import DTensor

            parameters = list(trainer.model_wrapped.parameters())
            sharded = sum(isinstance(p, DTensor) for p in parameters)
            line += f"FSDP2 rank={trainer.accelerator.process_index} sharded={sharded}/{len(parameters)}\n"
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks' lines never interleave
        end()

    trainer.end = end_after_digest
    if os.environ.get("TRL_OFFLINE_TEST_CPU_FSDP"):
        # Saving a model trained under FSDP2 on CPU processes fails in `save_pretrained` for TRL's own SFTTrainer
        # too ("invalid python storage" in safetensors); the run is checked through its losses and digests
        trainer.save_model = lambda *args, **kwargs: None
    original_train_and_save(trainer, script_args, training_args)


original_train_and_save = common.train_and_save
common.train_and_save = train_and_save  # before the script imports it

if __name__ == "__main__":
    script = importlib.import_module(f"trl_offline.scripts.{sys.argv[1]}")
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(fail_with_unknown_args=False)
    script.main(script_args, training_args, model_args)
