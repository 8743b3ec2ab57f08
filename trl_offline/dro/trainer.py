import contextlib
import copy
import functools
import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers.utils import logging
from trl import create_reference_model
from trl.data_utils import get_dataset_column_names

from .._trl_compat import create_model_from_path, disable_dropout_in_model, use_adapter
from ..data import map_kwargs
from ..losses import dro_loss
from ..offline_trainer import STREAM_SAMPLE_ROWS, OfflineRLTrainer
from .config import DROConfig
from .joint_model import attach_value_model, is_value_key, value_state_dict, without_value
from .reward_scaling import RewardStatistics, describe_strength, optimum_log_odds
from .value_setup import VALUE_DIR, DROValueMixin


logger = logging.get_logger(__name__)

REF_ADAPTER = "ref"  # the frozen copy of a pretrained adapter that live reference passes run with (KTO's name)


class DROTrainer(DROValueMixin, OfflineRLTrainer):
    """
    Trainer for Direct Reward Optimisation (DRO, Richemond et al. 2024, arXiv 2405.19107), a drop-in for
    [`~trl.KTOTrainer`] on data with one score per response: a thumbs up or down, or a float reward.

    The policy and a value network `V(x)` are trained together, in the same step, on
    `1/2 (r - V(x) - beta * log(pi(y|x) / pi_ref(y|x)))^2` ([`~trl_offline.dro_loss`], averaged over sequences). The
    value network rides on the model as its submodule `dro_value` (see `trl_offline.dro.joint_model`), so one
    `accelerate`/DeepSpeed engine holds both; [`DROTrainer.value_model`] returns it. `save_model` writes the policy as
    a plain causal LM (or adapter) and the value network in a `value/` subfolder; checkpoints resume both, with their
    optimizer state.

    Before training, once: rows get a reward (a `reward` column, KTO `label`s as 1.0/0.0, unpaired
    `chosen`/`rejected` rows, or `reward_funcs`), put on `beta`'s scale over the training set with `reward_scaling`
    (the log says how far `beta` then lets the policy move), and, with `precompute_ref_log_probs`, the reference's
    log-probability of each completion.

    Args:
        model: Model to train, as a path or hub id, a [`~transformers.PreTrainedModel`] or a PEFT model.
        ref_model: Frozen reference. By default the model as it is before training (with `peft_config`, the base
            model with the adapters disabled), so no second copy is loaded while the log-probabilities are
            precomputed.
        args ([`DROConfig`], *optional*): Configuration.
        train_dataset ([`~datasets.Dataset`]): KTO data (`prompt` + `completion` + `label`), `prompt` + `completion`
            + `reward` rows, `chosen`/`rejected` rows (unpaired), or rows without a score and `reward_funcs`; standard
            or conversational.
        reward_funcs: Reward functions with GRPO's signature, sequence-classification models or paths to them, or a
            list of them (weighted by `args.reward_weights`), scoring every row once before training.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*): Quantization of the model when it is
            loaded from a path; with `peft_config`, QLoRA. An error with a model already instantiated. The models the
            trainer loads beside the policy (a live reference, the separate value network's body) are quantized alike.
        Everything else: as in [`~trl.KTOTrainer`].
    """

    _tag_names = ["trl", "trl-offline", "dro"]
    _name = "DRO"
    _config_class = DROConfig
    _paper = {
        "title": "Offline Regularised Reinforcement Learning for Large Language Models Alignment",
        "id": "2405.19107",
        "citation": textwrap.dedent("""\
            @article{richemond2024offline,
                title        = {{Offline Regularised Reinforcement Learning for Large Language Models Alignment}},
                author       = {Pierre Harvey Richemond and Yunhao Tang and Daniel Guo and Daniele Calandriello and Mohammad Gheshlaghi Azar and Rafael Rafailov and Bernardo Avila Pires and Eugene Tarassov and Lucas Spangher and Will Ellsworth and Aliaksei Severyn and Jonathan Mallinson and Lior Shani and Gil Shamir and Rishabh Joshi and Tianqi Liu and R{\\'e}mi Munos and Bilal Piot},
                year         = 2024,
                journal      = {arXiv preprint arXiv:2405.19107}
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: DROConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        reward_funcs=None,
        reward_processing_classes=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = self._as_config(model, args)
        if (
            not args.precompute_ref_log_probs
            and ref_model is None
            and peft_config is None
            and (isinstance(model, str) or not is_peft_model(model))
        ):
            # Live reference passes need the model as it was before training: keep a copy
            ref_model = (
                create_model_from_path(model, **self.model_init_kwargs(args, quantization_config))
                if isinstance(model, str)
                else create_reference_model(model)
            )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_funcs=reward_funcs,
            reward_processing_classes=reward_processing_classes,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference_logps(self.train_dataset, "train")
            self.eval_dataset = self._map_named(self.eval_dataset, self._with_reference_logps)
            self.release_reference_engine()
            self._train_value_adapter()
        self.reward_shift, self.reward_scale = self._reward_statistics(self.train_dataset)
        self._unnormalized = (self.train_dataset, self.eval_dataset)  # scaled again on a resume
        self._scale_rewards()

        self._reference_adapter = self._add_reference_adapter(ref_model)  # before the value network joins the model
        policy = self.accelerator.unwrap_model(self.model)
        attach_value_model(
            policy.get_base_model() if is_peft_model(policy) else policy,
            self._new_value_model,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
        del self._new_value_model
        if args.disable_dropout:
            disable_dropout_in_model(self.value_model)
        if not self.is_deepspeed_enabled:  # DeepSpeed places the whole model when it builds its engine
            self.value_model.to(self.args.device)
        elif args.value_learning_rate not in (None, args.learning_rate):
            if "optimizer" in self.accelerator.state.deepspeed_plugin.deepspeed_config:
                raise ValueError(
                    "`value_learning_rate` needs the trainer's optimizer, but the DeepSpeed config defines its own "
                    "(one learning rate for every parameter): remove its 'optimizer' section or leave "
                    "`value_learning_rate` unset."
                )
        if self.optimizer is not None:  # the user's, from `optimizers`: refused here rather than when `train()` starts
            self._check_user_optimizer(self.optimizer)

    # -- before training ---------------------------------------------------------------------------------------------

    def _with_reference_logps(self, dataset: Dataset, name: str) -> Dataset:
        """`dataset` with `ref_logp`, the reference's log-probability of each completion (a sum over its tokens)."""
        batch_size = self.args.precompute_ref_batch_size or (
            self.args.per_device_train_batch_size if name == "train" else self.args.per_device_eval_batch_size
        )
        rows = dataset.select_columns(["prompt_ids", "completion_ids"])

        def score(indices: list[int]) -> dict[str, torch.Tensor]:
            batch = self.collate_rows(rows, indices)
            with self.reference_model() as model:
                logps, mask = self.reference_forward(model, batch)
            return {"ref_logp": (logps * mask).sum(-1)}  # (B,)

        return self.cached_columns(
            dataset,
            self.reference_cache_key(dataset, "dro-ref-logp"),
            lambda: self.map_rows(len(rows), score, batch_size, f"DRO: reference log-probs of the {name} rows"),
        )

    def streaming_refusal(self, args) -> str | None:
        if args.precompute_ref_log_probs:
            return (
                "`precompute_ref_log_probs=True` scores every row with the reference before training; set it to "
                "False to stream with the reference run on each batch"
            )
        return None

    def _reward_statistics(self, dataset: Dataset | IterableDataset) -> tuple[float, float]:
        """The shift and scale of `reward_scaling`, from the training rewards (a stream's first
        `STREAM_SAMPLE_ROWS`); logs, and warns where it is out of bounds, how far `beta` lets the policy move."""
        if isinstance(dataset, IterableDataset):
            rewards = [row["reward"] for row in dataset.select_columns(["reward"]).take(STREAM_SAMPLE_ROWS)]
            logger.info(f"Reward statistics from the stream's first {len(rewards)} rows.")
        else:
            rewards = dataset["reward"]
        statistics = RewardStatistics(torch.tensor(list(rewards), dtype=torch.float64), self.args.reward_scaling)
        if statistics.all_equal:
            logger.warning(
                f"Every training reward equals {statistics.mean:g}: DRO can only learn to stay at the reference. Mix "
                "scores (e.g. thumbs up and down)."
            )
        else:
            sentence, out_of_bounds = describe_strength(statistics.scaled_range, self.args.beta)
            (logger.warning if out_of_bounds else logger.info)(sentence)
        self.precompute_metrics.update(
            {
                "reward/raw_mean": statistics.mean,
                "reward/raw_std": statistics.std,
                "reward/raw_range": statistics.range,
                "beta/optimum_log_odds": optimum_log_odds(statistics.scaled_range, self.args.beta),
            }
        )
        return statistics.shift, statistics.scale

    @functools.cached_property
    def _train_fingerprint(self) -> str:
        # Only a save or a resume needs it: not hashed at start-up
        return self.data_fingerprint(self._unnormalized[0])

    def _scale_rewards(self) -> None:
        train, evaluation = self._unnormalized
        self.train_dataset = self._normalized(train)
        self.eval_dataset = self._map_named(evaluation, lambda dataset, name: self._normalized(dataset))

    def precompute_state(self) -> dict:
        return {
            "data_fingerprint": self._train_fingerprint,
            "reward_shift": self.reward_shift,
            "reward_scale": self.reward_scale,
            "metrics": dict(self.precompute_metrics),
        }

    def load_precompute_state(self, state: dict) -> None:
        """The reward statistics of the run being resumed (rewards from a reward model may differ in the last bits
        when scored again)."""
        if state["data_fingerprint"] != self._train_fingerprint:
            logger.warning(
                "The checkpoint's reward statistics were computed on other training rows: they are not reused, and "
                "training goes on with the rewards standardised as computed now."
            )
            return
        self.reward_shift, self.reward_scale = state["reward_shift"], state["reward_scale"]
        self.precompute_metrics.update(state["metrics"])
        self._scale_rewards()

    def _normalized(self, dataset: Dataset | None) -> Dataset | None:
        if dataset is None or (self.reward_shift, self.reward_scale) == (0.0, 1.0):
            return dataset
        shift, scale = self.reward_shift, self.reward_scale
        return dataset.map(
            lambda row: {"reward": (row["reward"] - shift) / scale},
            **map_kwargs(dataset, desc="Scaling rewards"),
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here is prepared like the ones given at construction
        is_dataset = isinstance(eval_dataset, Dataset | IterableDataset)
        if is_dataset and "prompt_ids" not in get_dataset_column_names(eval_dataset):
            eval_dataset = self.prepare_eval_dataset(eval_dataset)
            if self.args.precompute_ref_log_probs:
                eval_dataset = self._with_reference_logps(eval_dataset, "eval")
                self.release_reference_engine()
            eval_dataset = self._normalized(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # -- optimisation ------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, completion_mask = (
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
        )
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        forward_kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False
        )
        prompt_mask = attention_mask * (1 - completion_mask)  # (B, T) 1 on prompt tokens
        outputs = model(**forward_kwargs, **self.policy_forward_kwargs(), value_prompt_mask=prompt_mask)
        logps = self._sequence_logps(outputs.policy, completion_mask)  # (B,)
        if "ref_logp" in inputs:
            ref_logps = inputs["ref_logp"]  # (B,)
        else:
            with torch.no_grad(), self._live_reference(model) as reference:
                ref_logps = self._sequence_logps(reference(**forward_kwargs), completion_mask)  # (B,)
        per_sequence, metrics = dro_loss(
            logps.float(),
            ref_logps.float(),
            outputs.prompt_values,
            inputs["reward"].float(),
            beta=self.args.beta,
            rescale_policy_grad=self.args.rescale_policy_grad,
        )  # (B,)
        loss = per_sequence.mean()  # the batch mean over sequences; the Trainer divides by accumulation
        loss = self.add_aux_loss(loss, outputs.policy, mode, len(per_sequence))

        rows = {
            "rows": torch.ones_like(per_sequence),
            "loss/policy": metrics["policy_loss"],
            "loss/value": per_sequence.detach(),
            "residual/mean": metrics["residual"],
            "residual/abs": metrics["residual"].abs(),
            "log_ratio/mean": metrics["log_ratio"],
            "value/mean": outputs.prompt_values.detach(),
            "reward/mean": inputs["reward"],
        }
        # How well V(x) predicts the rewards the rows realise (the optimum's V*(x) is their soft maximum under pi_ref)
        correlations = {"value/reward_correlation": (outputs.prompt_values, inputs["reward"])}
        self.log_row_metrics(mode, rows, dict.fromkeys([k for k in rows if k != "rows"], "rows"), correlations)
        if not return_outputs:
            return loss
        return loss, self.row_predictions(logps.detach(), ref_logps, outputs.prompt_values.detach())

    @staticmethod
    def _sequence_logps(outputs, completion_mask: torch.Tensor) -> torch.Tensor:
        """`log pi(y|x)`, `(B,)`: the sum of the completion's token log-probabilities (a mean would change `beta`)."""
        token_logps = outputs.log_probs[:, -(completion_mask.shape[1] - 1) :]  # (B, T - 1); PEFT may prepend tokens
        return (token_logps * completion_mask[:, 1:]).sum(-1)  # (B,)

    @contextlib.contextmanager
    def _live_reference(self, model):
        """The reference for per-batch log-probabilities: `ref_model`; or the training model (under its wrapper) with
        the frozen copy of a pretrained adapter active (see `_add_reference_adapter`); or, with the adapters the
        trainer created (which start at zero), with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with use_adapter(self.accelerator.unwrap_model(model), adapter_name=self._reference_adapter):
                yield model
            self._train_value_adapter()

    def _add_reference_adapter(self, ref_model) -> str | None:
        """With a pretrained `PeftModel` and no `ref_model`, the reference is the model as passed, its adapter
        included, as `KTOTrainer` has it: the precomputed log-probabilities read it before training, and for live
        reference passes a frozen copy of the adapter, named `"ref"`, is added here (PEFT saves it in `ref/`). Returns
        the adapter the live reference runs with (`None`: adapters disabled)."""
        model = self.accelerator.unwrap_model(self.model)
        if (
            self.args.precompute_ref_log_probs
            or ref_model is not None
            or self._reference_disables_adapters
            or not is_peft_model(model)
        ):
            return None
        if REF_ADAPTER in model.peft_config:
            raise ValueError(
                f"The model already has an adapter named '{REF_ADAPTER}': DROTrainer adds the frozen copy of your "
                "adapter that live reference passes run with under that name. Rename or delete it, pass a "
                "`ref_model`, or set `precompute_ref_log_probs=True`."
            )
        active = model.active_adapter
        model.add_adapter(REF_ADAPTER, copy.deepcopy(model.peft_config[active]))  # added frozen
        parameters = dict(model.named_parameters())
        for name, parameter in parameters.items():
            if f".{active}." in name:
                # A copy in the adapter's own dtype and device, so that the reference is the same numbers
                frozen = parameters[name.replace(f".{active}.", f".{REF_ADAPTER}.", 1)]
                frozen.data = parameter.detach().clone()
                frozen.requires_grad_(False)
        return REF_ADAPTER

    # -- saving and resuming -----------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # A state dict given (gathered under ZeRO-3 or FSDP) holds the value's weights too; without one, the value
        # saves its live weights
        value_state = value_state_dict(state_dict) if state_dict else None
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        # The policy's checkpoint is a plain causal LM or adapter: the value's weights go to their own folder. (PEFT
        # keeps only adapter weights, but would take the LoRA weights of a PEFT value body for the policy's adapter.)
        super()._save(output_dir, state_dict=without_value(state_dict))
        if self.args.should_save:
            self.value_model.save_pretrained(os.path.join(output_dir, VALUE_DIR), state_dict=value_state)

    def _issue_warnings_after_load(self, load_result):
        # The policy's checkpoint never holds the value network, which is loaded from `value/` right after
        missing = [key for key in load_result.missing_keys if not is_value_key(key)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # with PEFT, loads the value adapter too
        self.value_model.load_weights(os.path.join(resume_from_checkpoint, VALUE_DIR))
        self._train_value_adapter()

    def _load_best_model(self):
        super()._load_best_model()
        if not self.is_deepspeed_enabled:  # DeepSpeed's checkpoint holds the value network with the policy
            self.value_model.load_weights(os.path.join(self.state.best_model_checkpoint, VALUE_DIR))
