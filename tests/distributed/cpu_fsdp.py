"""FSDP2 on CPU processes, for tests.

torch's FSDP2 (`fully_shard`) runs on CPU tensors over gloo, but accelerate turns FSDP on only for accelerator
devices: on a CPU it sets up plain DDP (`MULTI_CPU`) and drops the FSDP plugin, so a Trainer given `fsdp=...` quietly
trains with DDP. `enable_fsdp_on_cpu` keeps the plugin in that case, so the Trainer shards with FSDP2 as it would on
GPUs; everything else (accelerate's FSDP2 preparation, the Trainer, torch's FSDP2) is the real code.
"""

import functools


def enable_fsdp_on_cpu() -> None:
    from accelerate import state
    from accelerate.utils import DistributedType

    original_init = state.AcceleratorState.__init__

    @functools.wraps(original_init)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does for its own types: a later `AcceleratorState()` copies the partial state's type
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init
