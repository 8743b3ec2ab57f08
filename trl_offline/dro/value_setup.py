"""DRO's value network on the trainer: which one `value_network` builds (a separate body, a head on the policy's
features, or a second adapter), how it stays trainable on a quantized base, and the optimizer that trains it with the
policy in one step."""

import copy

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModel

from ..quantization import cast_adapters_to_bf16, is_quantized, keep_4bit_layers_differentiable, peft_model_kwargs
from .joint_model import VALUE_ATTR
from .value_networks import AdapterValueHead, PromptEndValueHead, PromptValueModel


VALUE_DIR = "value"  # the value network's subfolder in saved models and checkpoints
# The LoRA adapter of a separate value body on a quantized base; PEFT saves it in `value/body/`
VALUE_BODY_ADAPTER = "body"


class DROValueMixin:
    """The value network's part of [`DROTrainer`]: built while the model is set up (`_maybe_wrap_peft`), trained by
    the optimizer the trainer builds."""

    @property
    def value_model(self) -> PromptEndValueHead:
        """The value network `V(x)` trained with the policy."""
        policy = self.accelerator.unwrap_model(self.model)
        return getattr(policy.get_base_model() if is_peft_model(policy) else policy, VALUE_ATTR)

    def value_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the value's loss trains: the value network's, and with `value_network="adapter"` its
        adapter's (which live in the PEFT layers)."""
        parameters = list(self.value_model.parameters())
        if self.args.value_network == "adapter":
            parameters += _adapter_parameters(self.accelerator.unwrap_model(self.model), VALUE_DIR)
        return parameters

    def _maybe_wrap_peft(self, model, peft_config, args):
        # The value network's body is a copy of the model as loaded, taken before PEFT puts adapters into it
        self._new_value_model = self._build_value_model(model, peft_config, args)
        model = super()._maybe_wrap_peft(model, peft_config, args)
        if args.value_network == "adapter":
            self._add_value_adapter(model, args)
        return model

    def _add_value_adapter(self, model, args) -> None:
        if not is_peft_model(model):
            raise ValueError(
                "`value_network='adapter'` puts the value in a second PEFT adapter: pass a `peft_config` (or a PEFT "
                "model), or choose `value_network='separate'` or `'policy_head'`."
            )
        policy_config = model.peft_config[model.active_adapter]
        if policy_config.is_prompt_learning:
            raise ValueError(
                f"`value_network='adapter'` needs an adapter in the model's layers (e.g. LoRA), not "
                f"{policy_config.peft_type}; choose `value_network='separate'` or `'policy_head'`."
            )
        # Named like the value's subfolder: PEFT saves a second adapter in a subfolder of its name, beside the head
        model.add_adapter(VALUE_DIR, copy.deepcopy(policy_config), **peft_model_kwargs(model, args))
        for parameter in _adapter_parameters(model, VALUE_DIR):  # PEFT adds it frozen
            parameter.requires_grad_(True)

    def _train_value_adapter(self) -> None:
        """PEFT loads a second adapter frozen, and re-freezes every inactive adapter when adapters come back on after a
        reference pass; the value's loss trains this one, so it is made trainable again."""
        if self.args.value_network != "adapter":
            return
        for parameter in _adapter_parameters(self.accelerator.unwrap_model(self.model), VALUE_DIR):
            parameter.requires_grad_(True)

    def _build_value_model(self, model, peft_config, args) -> PromptEndValueHead:
        hidden_size = model.config.get_text_config().hidden_size
        if args.value_network == "policy_head":
            return PromptEndValueHead(hidden_size)
        if args.value_network == "adapter":
            return AdapterValueHead(hidden_size, adapter_name=VALUE_DIR)
        sharded = any(hasattr(parameter, "ds_id") for parameter in model.parameters())  # ZeRO-3 partitioned at load
        quantized = is_quantized(model)
        if sharded or is_peft_model(model) or quantized:
            # The weights in memory are shards, carry adapters or are quantized: load the checkpoint's body instead,
            # quantized as the policy is
            source = (
                model.peft_config[model.active_adapter].base_model_name_or_path
                if is_peft_model(model)
                else model.config._name_or_path
            )
            kwargs = self.model_init_kwargs(args)
            if quantized:
                kwargs["quantization_config"] = model.config.quantization_config
            body = AutoModel.from_pretrained(source, **kwargs)
        else:
            body = copy.deepcopy(model.base_model)
        if quantized:
            body = self._adapt_value_body(body, model, peft_config, args)
        return PromptValueModel(body)

    @staticmethod
    def _adapt_value_body(body, model, peft_config, args):
        """The separate value body on a quantized base, made trainable the way the policy is: its quantized weights
        cannot train, so it gets a LoRA adapter of its own, a copy of the policy's adapter configuration (as QLoRA
        trains the policy), under the name `VALUE_BODY_ADAPTER`. Its weights stay apart from the policy's, as the
        paper has the value network; only the adapter and the head are saved, in the `value/` folder."""
        from peft import get_peft_model

        policy_config = model.peft_config[model.active_adapter] if is_peft_model(model) else peft_config
        if policy_config is None:
            raise ValueError(
                "The model is quantized, and a quantized model trains through adapters: pass a `peft_config` (QLoRA), "
                "or load the model unquantized."
            )
        if policy_config.is_prompt_learning:
            raise ValueError(
                f"On a quantized model, `value_network='separate'` trains a copy of the policy's adapter in the value "
                f"body, which needs an adapter in the layers (e.g. LoRA), not {policy_config.peft_type}; choose "
                "`value_network='policy_head'`."
            )
        config = copy.deepcopy(policy_config)
        config.task_type = None  # the body has no LM head: a plain `PeftModel`
        keep_4bit_layers_differentiable(body)
        body = get_peft_model(body, config, adapter_name=VALUE_BODY_ADAPTER, **peft_model_kwargs(body, args))
        if args.gradient_checkpointing:  # as for the policy: frozen embeddings feed the checkpointed layers
            body.enable_input_require_grads()
        cast_adapters_to_bf16(body)
        return body

    def create_optimizer(self, model=None):
        """TRL's optimizer, with the value network's parameters moved to groups of their own at `value_learning_rate`
        (the learning-rate scheduler and gradient clipping apply to them as to the policy's).

        An optimizer of your own (`trainer.optimizer`) is used as it is, provided it holds every parameter of
        [`DROTrainer.value_parameters`]: the value network is trained in the same step as the policy. The trainer
        builds the value network, so an optimizer made before the trainer (`optimizers=(optimizer, scheduler)`)
        cannot hold it and is refused: choose the optimizer with `optim` and `optim_args` (as for any TRL trainer) and
        let the trainer build it over both networks, or build yours after the trainer over `trainer.model.parameters()`
        (the value network is the model's submodule `dro_value`) and set `trainer.optimizer` before `train()`.
        """
        if self.optimizer is not None:
            # Once training has prepared it, accelerate's wrapper holds the optimizer (e.g. on a second `train()`)
            if getattr(self.optimizer, "optimizer", self.optimizer) is not getattr(self, "_built_optimizer", None):
                self._check_user_optimizer(self.optimizer)
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        self._built_optimizer = optimizer
        if self.args.value_learning_rate is None or self.args.value_learning_rate == self.args.learning_rate:
            return optimizer
        value_parameters = {id(p) for p in self.value_parameters()}
        value_groups = []
        for group in optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in value_parameters]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in value_parameters]
                value_groups.append({**group, "params": moved, "lr": self.args.value_learning_rate})
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        for group in value_groups:
            optimizer.add_param_group(group)
        return optimizer

    def _check_user_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuses an optimizer of the user's that would leave the value network untrained, or that
        `value_learning_rate` would be silently ignored by."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        value_parameters = self.value_parameters()
        missing = sum(id(p) not in held for p in value_parameters)
        if missing:
            raise ValueError(
                f"The optimizer you gave the trainer does not hold {missing} of the {len(value_parameters)} parameters "
                "of DRO's value network V(x) (`trainer.value_parameters()`), which is trained in the same step as "
                "the policy: they would never train. The trainer builds the value network itself, so an optimizer "
                "made before the trainer cannot hold it. Either leave `optimizers` unset and choose the optimizer with "
                "`optim` and `optim_args` in `DROConfig` (the value's learning rate with `value_learning_rate`), or "
                "build your optimizer after the trainer over `trainer.model.parameters()` (the value network is the "
                "model's submodule `dro_value`) and set `trainer.optimizer` (and `trainer.lr_scheduler`) before "
                "`trainer.train()`."
            )
        if self.args.value_learning_rate is not None:
            raise ValueError(
                f"`value_learning_rate={self.args.value_learning_rate}` sets the value network's learning rate in the "
                "optimizer the trainer builds, but you gave your own optimizer. Put the value network's parameters "
                "(`trainer.value_parameters()`) in a parameter group of yours with the learning rate you want, and "
                "leave `value_learning_rate` unset."
            )


def _adapter_parameters(model, adapter_name: str) -> list[torch.nn.Parameter]:
    """The weights of one PEFT adapter: in each tuner layer, the entries named `adapter_name` of its adapter
    `ModuleDict`s (`lora_A`, `lora_B`, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parameters = []
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for attribute in layer.adapter_layer_names:
                adapters = getattr(layer, attribute)
                if adapter_name in adapters:
                    entry = adapters[adapter_name]  # a module, or a parameter in a `ParameterDict`
                    parameters += [entry] if isinstance(entry, torch.nn.Parameter) else list(entry.parameters())
    return parameters
