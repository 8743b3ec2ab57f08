import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from trl import SFTTrainer

from ..data import check_sft_dataset
from ..losses import iqlearn_loss
from ..model_card import write_model_card
from ..ops.soft_q_head import add_soft_q_head
from ..quantization import is_quantized, keep_4bit_layers_differentiable
from .config import IQLearnConfig
from .soft_value import SoftValueMixin


class IQLearnTrainer(SoftValueMixin, SFTTrainer):
    """
    Trainer for offline inverse soft-Q learning (IQLearn) on demonstrations, a drop-in for [`~trl.SFTTrainer`].

    The per-token negative log-likelihood of SFT gains a temporal-difference term on the implicit reward
    `Q(s_t, a_t) - gamma * V(s_{t+1})`, with `Q(s, a) = V(s) + log pi(a|s)` (Wulfmeier et al. 2024, Eq. 14). `V` is a
    learned value head on the final hidden state by default (`soft_value="head"`, saved beside the model as
    `soft_value_head.safetensors`), or the logits' logsumexp. With `td_coef=0` the loss is exactly SFT's. The constructor, dataset formats (`text`, `messages`,
    prompt-completion, standard and conversational), `completion_only_loss`, `assistant_only_loss`, packing,
    padding-free batches, PEFT and `max_length` are SFT's (in a packed row each sequence is its own episode); what
    IQLearn cannot honour (other loss types, a custom `compute_loss_func`) is refused at construction.

    Like `SFTTrainer`, the training forward never builds the `(batch, seq_len, vocab)` logits: the Q-value of the
    taken token and the logsumexp are computed tile by tile from the final hidden states.

    After or without training, [`~IQLearnTrainer.compute_implicit_rewards`] scores (prompt, completion) rows with the
    reward the model implies.

    Args:
        model: Model to train, as a path or hub id, a [`~transformers.PreTrainedModel`] or a PEFT model.
        args ([`IQLearnConfig`], *optional*): Configuration; a plain `TrainingArguments` or `SFTConfig` is converted.
        Everything else: as in [`~trl.SFTTrainer`], except `compute_loss_func`, which IQLearn does not accept.
    """

    _tag_names = ["trl", "trl-offline", "iqlearn"]
    _name = "IQLearn"
    _paper = {
        "title": "Imitating Language via Scalable Inverse Reinforcement Learning",
        "id": "2409.01369",
        "citation": """\
@inproceedings{wulfmeier2024imitating,
    title        = {{Imitating Language via Scalable Inverse Reinforcement Learning}},
    author       = {Markus Wulfmeier and Michael Bloesch and Nino Vieillard and Arun Ahuja and J{\\"o}rg Bornschein and Sandy Huang and Artem Sokolov and Matt Barnes and Guillaume Desjardins and Alex Bewley and Sarah Maria Elisabeth Bechtle and Jost Tobias Springenberg and Nikola Momchev and Olivier Bachem and Matthieu Geist and Martin Riedmiller},
    year         = 2024,
    booktitle    = {Advances in Neural Information Processing Systems 38},
    eprint       = {arXiv:2409.01369}
}""",
    }

    def __init__(
        self,
        model,
        args: IQLearnConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config=None,
        peft_config=None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = IQLearnConfig(f"{os.path.basename(model_name.rstrip('/')) or 'model'}-IQLearn")
        elif not isinstance(args, IQLearnConfig):
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides it
            args = IQLearnConfig(**dict_args)
        if compute_loss_func is not None:
            raise ValueError("IQLearnTrainer defines its own loss, so it does not accept a `compute_loss_func`.")
        if args.use_liger_kernel and (args.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            # Liger's layer kernels (norms, RoPE, MLPs) leave the forward alone and run under the soft-Q head
            raise ValueError(
                '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: it replaces the model\'s '
                "forward with one that returns only the cross-entropy, and IQLearn reads `Q(s, a)` and `V(s)` through "
                "its own soft-Q head in that forward. Leave `fused_linear_cross_entropy` out of `liger_kernel_config`; "
                "the soft-Q head already never builds the full logits."
            )
        skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset"))
        if train_dataset is not None and formatting_func is None and not skip_prepare:
            eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            for name, dataset in {"train": train_dataset, **eval_datasets}.items():
                if dataset is not None:
                    check_sft_dataset(dataset, args.dataset_text_field, name)

        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        if self._is_vlm or self._is_vision_dataset:
            raise ValueError(
                "IQLearnTrainer supports text-only causal language models; vision inputs are not supported."
            )
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (parallelism.cp_enabled or getattr(parallelism, "sp_enabled", False)):
            raise ValueError(
                "IQLearnTrainer does not support context or sequence parallelism: the temporal-difference term "
                "bootstraps from the next token, which may live on another rank."
            )

        base_model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_soft_q_head(base_model, chunk_size=args.logits_chunk_size)
        self._setup_soft_value(base_model, model)  # the learned value of `soft_value="head"`, loaded if saved
        if is_quantized(base_model):  # an evaluation between steps must not leave its 4-bit layers without a backward
            keep_4bit_layers_differentiable(base_model)
        self._scoring_implicit_rewards = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        # MoE models: the soft-Q head then also returns the load-balancing loss, as SFT's fused head does
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, soft_q_head=True)
        per_token_loss, metrics = iqlearn_loss(
            outputs.target_logits,
            outputs.logsumexp,
            outputs.completion_mask,
            td_coef=self.args.td_coef,
            gamma=self.args.gamma,
            segment_ids=outputs.segment_ids,  # packed and padding-free rows: each sequence ends on its own
            **self._soft_value_inputs(inputs, outputs),  # the learned value, and the last actions cut by max_length
        )  # (B, T)
        # Reduced like SFTTrainer: a sum over the completion tokens divided by their number across the whole
        # (accumulated, all-rank) batch when `num_items_in_batch` is given
        num_tokens = outputs.completion_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            # Added as `SFTTrainer` adds it: a per-micro-batch mean, so averaged over the accumulation steps when the
            # token loss is normalised over the whole accumulated batch
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_step_metrics(mode, inputs, outputs, metrics)
        if return_outputs:
            # `compute_metrics` wants the logits, which the soft-Q head never builds: recompute them, as SFT does
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _log_step_metrics(self, mode: str, inputs: dict, outputs, metrics: dict[str, torch.Tensor]) -> None:
        mask = outputs.completion_mask  # (B, T)
        num_sequences = _num_sequences_with_actions(mask, outputs.segment_ids)
        sums = torch.stack(
            [
                mask.sum(),
                metrics["nll"].sum(),
                metrics["td_loss"].sum(),
                outputs.entropy.detach().sum(),
                outputs.is_top1.sum(),
                metrics["implicit_reward"].sum(),  # summed per sequence, then over sequences
                num_sequences,
                _num_input_tokens(inputs, mask),
            ]
        ).float()
        # One gather per step for every metric
        totals = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
        n_tokens, nll, td, entropy, correct, reward, n_seqs, attended = totals
        per_token = 1 / n_tokens if n_tokens else 0.0
        self._metrics[mode]["nll"].append(nll * per_token)
        self._metrics[mode]["td_loss"].append(td * per_token)
        if mode == "train":
            self._check_td_scale(nll * per_token, td * per_token)  # once, at the first step
        self._metrics[mode]["entropy"].append(entropy * per_token)
        self._metrics[mode]["mean_token_accuracy"].append(correct * per_token)
        self._metrics[mode]["implicit_reward"].append(reward / n_seqs if n_seqs else 0.0)
        if mode == "train":
            self._total_train_tokens += int(attended)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:  # the mean over processes, as `SFTTrainer` logs it
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_loss)

    def compute_implicit_rewards(self, dataset: Dataset) -> list[float]:
        """Score rows with the IRL-extracted reward of the current model.

        For each row, the reward is the sum over its completion tokens of the implicit reward
        `Q(s_t, a_t) - gamma * V(s_{t+1})` the loss uses (Wulfmeier et al. 2024, reward analysis): the per-sequence
        reward the trained model implies. With `soft_value="head"` it reads the value head, which a trainer built on a
        saved model loads from beside it (see [`~IQLearnTrainer.load_soft_value_head`] for adapters). The dataset is prepared exactly like the training data (same formats, chat template,
        `completion_only_loss`, `assistant_only_loss`, `max_length`), scored with `per_device_eval_batch_size` and
        the trainer's distributed setup, and the rewards come back in the dataset's row order.

        Args:
            dataset (`datasets.Dataset`): Rows in any format the trainer trains on, e.g. `prompt` + `completion`.

        Returns:
            `list[float]`: One reward per row.
        """
        if not isinstance(dataset, Dataset):
            raise TypeError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
        check_sft_dataset(dataset, self.args.dataset_text_field, "scored")
        args = copy.copy(self.args)
        args.shuffle_dataset = False  # rewards are returned in row order
        prepared = self._prepare_dataset(dataset, self.processing_class, args, False, self._formatting_func, "scored")
        if len(prepared) != len(dataset):
            raise ValueError(
                f"{len(dataset) - len(prepared)} row(s) have no completion token left within `max_length` "
                f"({self.args.max_length}), so they have no implicit reward. Raise `max_length` or drop those rows."
            )
        with self._implicit_reward_mode():
            rewards = self.predict(prepared).predictions  # (num_rows, 1)
        return [float(r) for r in rewards.reshape(-1)]

    @contextlib.contextmanager
    def _implicit_reward_mode(self):
        self._scoring_implicit_rewards = True
        collator = self.data_collator
        if getattr(collator, "padding_free", False):
            # One reward per row: rows are scored padded, which gives the same values (the TD term and the attention
            # both stop at sequence boundaries) and keeps one output row per dataset row
            self.data_collator = dataclasses.replace(collator, padding_free=False)
        try:
            yield
        finally:
            self._scoring_implicit_rewards = False
            self.data_collator = collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self._scoring_implicit_rewards:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs, use_cache=False, soft_q_head=True)
            _, metrics = iqlearn_loss(
                outputs.target_logits,
                outputs.logsumexp,
                outputs.completion_mask,
                td_coef=self.args.td_coef,
                gamma=self.args.gamma,
                segment_ids=outputs.segment_ids,
                **self._soft_value_inputs(inputs, outputs),
            )
        # Returned as the "logits" so that `predict` gathers them across ranks in row order
        return None, metrics["implicit_reward"].sum(-1, keepdim=True), None  # (B, 1)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            write_model_card(self, output_dir)


def _num_sequences_with_actions(mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Number of sequences with at least one action; a packed or padding-free row holds several."""
    if segment_ids is None:
        return mask.any(dim=-1).sum()
    B, T = mask.shape
    # Segment indices count restarts along the row, so they lie in [0, T]
    actions = mask.long()  # (B, T)
    has_actions = actions.new_zeros(B, T + 1).scatter_reduce(1, segment_ids, actions, reduce="amax")  # (B, T + 1)
    return has_actions.sum()


def _num_input_tokens(inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """Tokens fed to the model, counted as `SFTTrainer` counts them: a padding-free batch has no attention mask, so
    every position of its one row counts."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "position_ids" in inputs:
        return torch.tensor(inputs["position_ids"].size(1), device=mask.device)
    return torch.tensor(0, device=mask.device)
