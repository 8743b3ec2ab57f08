"""DRO's value networks `V(x)` (Richemond et al. 2024, arXiv 2405.19107), trained jointly with the policy: a linear
head on the hidden state of the prompt's last token, read from the policy's own states ([`PromptEndValueHead`]), from
the policy's base run with a second adapter ([`AdapterValueHead`]), or from a transformer body of its own
([`PromptValueModel`], the paper's separate network, initialised from the reference).
"""

import os

import torch


class PromptEndValueHead(torch.nn.Module):
    """A linear head `V(x) = w . h + b` on the hidden state `h` of the prompt's last token, zero at initialisation (so
    an untrained value predicts 0, the mean of rewards standardised as DRO does by default). Written and read as
    `value_head.safetensors`.

    On its own it is DRO's cheapest value network: it reads the policy's own hidden states, detached, so it costs no
    second copy of the model and the value's loss never trains the policy's features (the paper found sharing the
    policy's weights with the value hurts; only the head is trained here).
    """

    HEAD_FILE = "value_head.safetensors"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def read_value(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B,)` float32 values from `(B, T, H)` hidden states at each row's last position with `attention_mask == 1`."""
        prompt_end = last_token_states(hidden_states, attention_mask)  # (B, H)
        return self.head(prompt_end.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, T, H)`): the policy's last hidden states (read detached).
            attention_mask (`torch.Tensor` of shape `(B, T)`): 1 on the prompt's tokens.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32: `V(x)`.
        """
        return self.read_value(hidden_states.detach(), attention_mask)

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """Writes the head into `path`. `state_dict` (this module's, e.g. gathered from ZeRO-3 shards) replaces the
        live weights."""
        from safetensors.torch import save_file

        state_dict = state_dict if state_dict is not None else self.state_dict()
        os.makedirs(path, exist_ok=True)
        head_state = {k.removeprefix("head."): v.contiguous() for k, v in state_dict.items() if k.startswith("head.")}
        save_file(head_state, os.path.join(path, self.HEAD_FILE))

    def load_weights(self, path: str) -> None:
        """Loads, in place, weights written by `save_pretrained(path)` (e.g. to resume training)."""
        from safetensors.torch import load_file

        self.head.load_state_dict(load_file(os.path.join(path, self.HEAD_FILE)))


class AdapterValueHead(PromptEndValueHead):
    """`V(x)` from the policy's own frozen base run with a second PEFT adapter, `adapter_name`, and this head: no
    second copy of the base weights. The adapter lives in the PEFT model (PEFT saves it); this module holds the head
    and the adapter's name. Unlike [`PromptEndValueHead`], the features are trained (through the adapter)."""

    def __init__(self, hidden_size: int, adapter_name: str):
        super().__init__(hidden_size)
        self.adapter_name = adapter_name

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, T, H)`): the base's last hidden states with the value adapter.
            attention_mask (`torch.Tensor` of shape `(B, T)`): 1 on the prompt's tokens.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32: `V(x)`.
        """
        return self.read_value(hidden_states, attention_mask)


class PromptValueModel(PromptEndValueHead):
    """`V(x)`: a transformer body of its own and a linear head on the last hidden state of the prompt's last token, one
    value per example: DRO's value network as the paper has it, apart from the policy's weights.

    `save_pretrained(dir)` writes the body as a transformers model (`config.json` + safetensors) and the head as
    `value_head.safetensors` beside it; `from_pretrained(dir)` reads them back.

    Args:
        body ([`~transformers.PreTrainedModel`]): a base model (`AutoModel`, no LM head) returning `last_hidden_state`.
    """

    def __init__(self, body):
        super().__init__(body.config.get_text_config().hidden_size)
        self.body = body

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "PromptValueModel":
        """The body from `path`, any checkpoint `AutoModel` reads (e.g. the reference causal LM, whose LM head is
        dropped), with the value head of `path` if it has one and a zero head otherwise."""
        from transformers import AutoModel

        model = cls(AutoModel.from_pretrained(path, **kwargs))
        if os.path.isfile(os.path.join(path, cls.HEAD_FILE)):
            PromptEndValueHead.load_weights(model, path)
        return model

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """Writes the body with `save_pretrained` and the head as safetensors. `state_dict` (this module's, e.g.
        gathered from ZeRO-3 shards) replaces the live weights."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        body_state = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
        self.body.save_pretrained(path, state_dict=body_state, **kwargs)
        super().save_pretrained(path, state_dict)

    def load_weights(self, path: str) -> None:
        from accelerate.utils import is_peft_model
        from safetensors.torch import load_file
        from transformers.trainer_utils import load_sharded_checkpoint

        single_file = os.path.join(path, "model.safetensors")
        if is_peft_model(self.body):  # a LoRA'd body (DRO on a quantized base): its adapter is all that was saved
            from peft import set_peft_model_state_dict

            name = self.body.active_adapter
            folder = path if name == "default" else os.path.join(path, name)  # where PEFT saves each adapter
            set_peft_model_state_dict(self.body, load_file(os.path.join(folder, "adapter_model.safetensors")), name)
        elif os.path.isfile(single_file):
            self.body.load_state_dict(load_file(single_file))
        else:  # a large body is written in shards, with an index
            load_sharded_checkpoint(self.body, path, strict=True)
        super().load_weights(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.Tensor` of shape `(B, T)`): prompts, padded on either side.
            attention_mask (`torch.Tensor` of shape `(B, T)`): 1 on real tokens.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32: `V(x)`.
        """
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.read_value(hidden, attention_mask)


def last_token_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B, H)`: each row's hidden state at its last position with `attention_mask == 1`, whichever side is padded."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (positions * attention_mask).argmax(-1)  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]  # (B, H)
