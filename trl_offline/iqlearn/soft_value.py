"""IQLearn's learned state value on the trainer (`soft_value="head"`): the head attached to the model, trained by the
trainer's optimizer, saved beside the policy and loaded back; and the two checks the objective needs at the edges of
an episode and of training: which last actions were cut by `max_length`, and the TD term's size at the first step."""

import os

import torch
from accelerate.utils import is_peft_model
from transformers.utils import cached_file, logging

from ..losses import next_action_values
from ..ops.soft_q_head import SOFT_VALUE_ATTR, SoftValueHead, add_soft_value_head


logger = logging.get_logger(__name__)

SOFT_VALUE_HEAD_FILE = "soft_value_head.safetensors"  # beside `model.safetensors` or the adapter


def end_of_sequence_ids(processing_class, model) -> list[int]:
    """Every token id that ends an episode: the tokenizer's eos and each of the generation config's."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    ids = [getattr(tokenizer, "eos_token_id", None)]
    generation_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += generation_ids if isinstance(generation_ids, (list, tuple)) else [generation_ids]
    return sorted({int(i) for i in ids if i is not None})


def truncated_actions(
    labels: torch.Tensor,
    completion_mask: torch.Tensor,
    end_ids: torch.Tensor,
    max_length: int | None,
    position_ids: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where an episode was cut by `max_length` rather than ended: the last action of a sequence that fills
    `max_length` and is not an end-of-sequence token. Rows are right-padded (as TRL's collator pads them), so
    without `position_ids` the token at `t + 1` is the `(t + 2)`-th of its sequence.

    Args:
        labels (`torch.Tensor` of shape `(B, T + 1)`): The batch's labels, `-100` off the actions.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 where the token at `t + 1` is an action.
        end_ids (`torch.Tensor`): The end-of-sequence token ids.
        max_length (`int` or `None`): The length sequences were truncated to; `None`: nothing was cut.
        position_ids (`torch.Tensor` of shape `(B, T + 1)`, *optional*): Positions within each sequence (packing).
        segment_ids (`torch.Tensor` of shape `(B, T)`, *optional*): Sequence index of each state (packing).

    Returns:
        `torch.Tensor` of shape `(B, T)`, bool.
    """
    mask = completion_mask.bool()  # (B, T)
    if max_length is None:
        return torch.zeros_like(mask)
    B, T = mask.shape
    # An action is its sequence's last when no next action of the same sequence has a value (1) to bootstrap from
    has_next = next_action_values(mask.float(), mask, segment_ids=segment_ids) > 0  # (B, T)
    actions = labels[:, 1:].to(mask.device)  # (B, T): the token taken at t
    ended = torch.isin(actions, end_ids.to(mask.device))  # (B, T)
    if position_ids is None:
        token_index = torch.arange(1, T + 1, device=mask.device).expand(B, T)  # (B, T)
    else:
        token_index = position_ids[:, 1:].to(mask.device).expand(B, T)  # (B, T)
    fills = token_index + 1 >= max_length  # (B, T): the token at t + 1 is the max_length-th of its sequence
    return mask & ~has_next & ~ended & fills


class SoftValueMixin:
    """The learned value's part of [`IQLearnTrainer`]. The head is the (base) model's submodule `soft_value_head`, so
    the engine DDP, DeepSpeed or FSDP builds around the model holds, reduces and shards it, and the optimizer the
    trainer builds trains it at the base learning rate."""

    @property
    def soft_value_head(self) -> SoftValueHead | None:
        """The learned value `v_phi(s)`, or `None` with `soft_value="logsumexp"`."""
        model = self.accelerator.unwrap_model(self.model)
        base_model = model.get_base_model() if is_peft_model(model) else model
        return getattr(base_model, SOFT_VALUE_ATTR, None) if self.args.soft_value == "head" else None

    def _setup_soft_value(self, base_model, model_source) -> None:
        self._end_ids = torch.tensor(end_of_sequence_ids(self.processing_class, base_model))
        self._td_scale_checked = False
        if self.args.soft_value != "head":
            return
        add_soft_value_head(base_model, backprop=self.args.soft_value_backprop)
        # A model saved by this trainer carries its head beside it: extracting its rewards, or training on, needs it
        path = _head_file(model_source) if isinstance(model_source, str) else None
        if path is not None:
            self.load_soft_value_head(os.path.dirname(path))

    def load_soft_value_head(self, path: str) -> None:
        """Loads the value head saved in the folder `path` (a model, adapter or checkpoint folder this trainer wrote),
        in place. The trainer does so itself when it is given a model path holding one; call it to score with an
        adapter saved with its head, or with a head saved elsewhere.

        Args:
            path (`str`): A folder holding `soft_value_head.safetensors`.
        """
        from safetensors.torch import load_file

        head = self.soft_value_head
        if head is None:
            raise ValueError("The value head is only used with `soft_value='head'`.")
        file = os.path.join(path, SOFT_VALUE_HEAD_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No value head at {file}: IQLearnTrainer saves it there with the model.")
        head.load_state_dict(load_file(file, device=str(head.linear.weight.device)))
        logger.info(f"Loaded the value head of `soft_value='head'` from {file}.")

    def _soft_value_inputs(self, inputs: dict, outputs) -> dict:
        """The keyword arguments of `iqlearn_loss` that the value and the episode ends decide."""
        segment_ids = getattr(outputs, "segment_ids", None)
        truncated = truncated_actions(
            inputs["labels"],
            outputs.completion_mask,
            self._end_ids,
            self.args.max_length,
            position_ids=inputs.get("position_ids"),
            segment_ids=segment_ids,
        )
        return {
            "state_values": outputs.state_values if self.args.soft_value == "head" else None,
            "next_state_values": outputs.next_state_values if self.args.soft_value == "head" else None,
            "truncated": truncated,
        }

    def _check_td_scale(self, nll: float, td_loss: float) -> None:
        """At the first training step, the TD term against the NLL: when it dominates, its gradient rewrites the
        levels of the logits before the policy improves."""
        if self._td_scale_checked:
            return
        self._td_scale_checked = True
        td_term = self.args.td_coef * td_loss
        logger.info(
            f"IQLearn at the first step: td_coef * td_loss = {td_term:.4g} against nll = {nll:.4g} per completion "
            f"token (td_coef={self.args.td_coef}, soft_value={self.args.soft_value!r})."
        )
        if td_term > nll:
            advice = (
                "`soft_value='head'` makes it indifferent to the logits' level; or lower `td_coef`"
                if self.args.soft_value == "logsumexp"
                else "lower `td_coef`"
            )
            logger.warning(
                f"The TD term dominates the loss at the first step: td_coef * td_loss = {td_term:.4g} > nll = "
                f"{nll:.4g} per token (td_coef={self.args.td_coef}, soft_value={self.args.soft_value!r}). Its "
                f"gradient may undo the model before the policy improves: {advice}."
            )

    # -- the optimizer, saving and resuming ----------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """TRL's optimizer, which holds the value head as a parameter of the model. An optimizer of your own
        (`optimizers=(optimizer, None)`) was built before the trainer made the head: the head is added to it as a
        parameter group with its defaults (its learning rate). With your own scheduler too, that group would escape
        it, so that is refused."""
        optimizer = super().create_optimizer(model)
        head = self.soft_value_head
        if head is None:
            return optimizer
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in head.parameters() if id(p) not in held]
        if missing:
            if self.lr_scheduler is not None:
                raise ValueError(
                    "With `soft_value='head'` the trainer adds a value head to the model, which an optimizer and "
                    "scheduler made before the trainer cannot hold. Pass the optimizer without a scheduler (the "
                    "head is added to it and the trainer builds the schedule), choose them with `optim` and "
                    "`lr_scheduler_type`, or set `soft_value='logsumexp'`."
                )
            optimizer.add_param_group({"params": missing})
            logger.info("The value head of `soft_value='head'` was added to your optimizer as a parameter group.")
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.soft_value_head is None:
            return super()._save(output_dir, state_dict=state_dict)
        # A state dict given (gathered under ZeRO-3 or FSDP) holds the head too; without one, the head saves its own
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        prefix = f"{SOFT_VALUE_ATTR}."
        head_state = {k.partition(prefix)[2]: v for k, v in state_dict.items() if prefix in k}
        # The policy stays a plain causal LM (or adapter): the head is written beside it
        super()._save(output_dir, state_dict={k: v for k, v in state_dict.items() if prefix not in k})
        if self.args.should_save and head_state:
            from safetensors.torch import save_file

            os.makedirs(output_dir, exist_ok=True)
            head_state = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
            save_file(head_state, os.path.join(output_dir, SOFT_VALUE_HEAD_FILE))

    def _issue_warnings_after_load(self, load_result):
        # The policy's weights never hold the head, which is loaded from its own file right after
        missing = [key for key in load_result.missing_keys if f"{SOFT_VALUE_ATTR}." not in key]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_saved_head(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        self._load_saved_head(self.state.best_model_checkpoint)

    def _load_saved_head(self, folder: str) -> None:
        # DeepSpeed's and FSDP's own checkpoints hold the head with the model
        if self.soft_value_head is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self.load_soft_value_head(folder)


def _head_file(model_source: str) -> str | None:
    """The value head file beside a model given as a local folder or a hub id, or `None` if there is none."""
    try:
        return cached_file(
            model_source,
            SOFT_VALUE_HEAD_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
