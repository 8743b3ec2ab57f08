import functools
import random
import textwrap

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers.utils import logging
from trl.models import unwrap_model_for_generation

from .._trl_compat import pad
from ..feature_store import FeatureStore
from ..losses import alol_loss
from ..offline_trainer import OfflineRLTrainer
from ..precompute import shard_batches
from .config import ALoLConfig
from .sampler import PriorityAdvantageSampler, positive_advantage_indices
from .value_head import AttentionPoolingValueHead, fit_value_head


logger = logging.get_logger(__name__)

# Columns of a row that describe its completion, not its prompt: not passed to reward functions scoring a new one
_COMPLETION_COLUMNS = {
    "completion",
    "completion_ids",
    "reward",
    "label",
    "ref_logp",
    "ref_logps",
    "value",
    "advantage",
}


class ALoLTrainer(OfflineRLTrainer):
    """
    Trainer for Advantage-Leftover-Lunch (A-LoL) offline policy gradient (Baheti et al. 2024, arXiv 2305.14718), a
    drop-in for [`~trl.SFTTrainer`] or [`~trl.DPOTrainer`] on data with a score per response.

    Before training, once: rows get a reward (a `reward` column, KTO `label`s or unpaired `chosen`/`rejected` rows, or
    `reward_funcs`); a value head `V_ref(x)` is fit on the frozen reference's prompt features; every row gets the
    reference's per-token log-probabilities and its advantage `A = R(x, y) - V_ref(x)`. Training then runs on the rows
    with `A > 0` only, drawn in proportion to `A` with `priority_sampling`, with the loss of `args.loss_type`
    ([`~trl_offline.alol_loss`]) averaged over sequences.

    Args:
        model: Model to train, as a path or hub id, a [`~transformers.PreTrainedModel`] or a PEFT model.
        ref_model: Frozen reference. By default the model as it is before training (with `peft_config`, the base
            model with the adapters disabled), so no second copy is loaded.
        args ([`ALoLConfig`], *optional*): Configuration.
        train_dataset ([`~datasets.Dataset`]): `prompt` + `completion` + `reward` rows, standard or conversational;
            or `label` (bool) rows; or `chosen`/`rejected` rows; or rows without a score and `reward_funcs`.
        reward_funcs: Reward functions with GRPO's signature, sequence-classification models or paths to them, or a
            list of them (weighted by `args.reward_weights`). With them, the value head is fit on the rewards of the
            reference's own greedy generations, as in the paper.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*): Quantization of the model when it is
            loaded from a path; with `peft_config`, QLoRA. An error with a model already instantiated.
        Everything else: as in [`~trl.KTOTrainer`].
    """

    _tag_names = ["trl", "trl-offline", "alol"]
    _name = "A-LoL"
    _config_class = ALoLConfig
    _paper = {
        "title": "Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models",
        "id": "2305.14718",
        "citation": textwrap.dedent("""\
            @inproceedings{baheti2024leftover,
                title        = {{Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models}},
                author       = {Ashutosh Baheti and Ximing Lu and Faeze Brahman and Ronan Le Bras and Maarten Sap and Mark Riedl},
                year         = 2024,
                booktitle    = {The Twelfth International Conference on Learning Representations},
                eprint       = {arXiv:2305.14718}
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: ALoLConfig | None = None,
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
        self.value_head: AttentionPoolingValueHead | None = None
        train = self.train_dataset
        self._scored_train = self.cached_columns(
            train,
            self.reference_cache_key(train, self._value_settings(), "alol-train"),
            lambda: self._fit_value_and_score(train),
            save_state=lambda path: torch.save(self.value_head.state_dict(), path),
            load_state=self._load_value_head,
        )
        self._select_positive_rows(positive_advantage_indices(self._scored_train["advantage"]))
        if self.eval_dataset is not None:
            self.eval_dataset = self._map_named(self.eval_dataset, self._score_eval)
        self.release_reference_engine()

    def streaming_refusal(self, args) -> str:
        return "its value head and the advantages need a pass over every row before training"

    @functools.cached_property
    def _train_fingerprint(self) -> str:
        # Only a save or a resume needs it: not hashed at start-up
        return self.data_fingerprint(self._scored_train)

    def _select_positive_rows(self, positive: list[int]) -> None:
        scored = self._scored_train
        self.precompute_metrics["advantage/positive_fraction"] = len(positive) / len(scored)
        logger.info(
            f"A-LoL trains on {len(positive)} of {len(scored)} rows ({len(positive) / len(scored):.1%}): those whose "
            "reward beats the reference's value."
        )
        self._positive_rows = positive
        self.train_dataset = scored.select(positive)

    def precompute_state(self) -> dict:
        return {
            "data_fingerprint": self._train_fingerprint,
            "value_head": {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()},
            "value": torch.tensor(list(self._scored_train["value"]), dtype=torch.float64),
            "positive_rows": torch.tensor(self._positive_rows, dtype=torch.long),
            "metrics": dict(self.precompute_metrics),
        }

    def load_precompute_state(self, state: dict) -> None:
        """The value head, values and rows of the run being resumed, so that it goes on with the rows it started with
        (a new fit, on a GPU, can differ in the last bits and move rows across `A = 0`)."""
        if state["data_fingerprint"] != self._train_fingerprint:
            logger.warning(
                "The checkpoint's A-LoL precompute was made on other training rows or rewards: it is not reused, and "
                "training goes on with the value head and rows computed now."
            )
            return
        self._load_value_head(state["value_head"])
        values = state["value"].tolist()
        rewards = self._scored_train["reward"]
        scored = self._scored_train.remove_columns(["value", "advantage"])
        scored = scored.add_column("value", values).add_column("advantage", [r - v for r, v in zip(rewards, values)])
        self._scored_train = scored
        self.precompute_metrics.update(state["metrics"])
        self._select_positive_rows(state["positive_rows"].tolist())

    # -- before training ---------------------------------------------------------------------------------------------

    def _value_settings(self) -> tuple:
        a = self.args
        return (
            a.value_num_prompts,
            a.max_completion_length,
            a.value_num_heads,
            a.value_num_epochs,
            a.value_learning_rate,
            a.value_batch_size,
            a.value_validation_fraction,
            a.seed,
            self.reward_funcs is not None,
        )

    def _batch_size(self, mode: str) -> int:
        default = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        return self.args.precompute_ref_batch_size or default

    def _value_prompt_rows(self, dataset: Dataset) -> list[int]:
        """A seeded subset of rows with distinct prompts, `value_num_prompts` at most."""
        order = list(range(len(dataset)))
        random.Random(self.args.seed).shuffle(order)
        rows, seen = [], set()
        for row, prompt_ids in zip(order, dataset.select(order)["prompt_ids"]):
            if tuple(prompt_ids) not in seen:
                seen.add(tuple(prompt_ids))
                rows.append(row)
                if len(rows) == self.args.value_num_prompts:
                    break
        return sorted(rows)

    def _fit_value_and_score(self, dataset: Dataset) -> dict[str, list]:
        rows = self._value_prompt_rows(dataset)
        prompts = dataset.select(rows)
        batch_size = self._batch_size("train")
        if self.reward_funcs is not None:
            targets = self._reference_greedy_rewards(prompts, batch_size)
        else:
            logger.warning(
                "No `reward_funcs`: the value head is fit on the dataset's own rewards, so V(x) estimates the value of "
                "the policy that wrote the data, not of the reference model (the paper fits it on the rewards of the "
                "reference's greedy generations). Pass `reward_funcs` for the paper's recipe."
            )
            targets = prompts["reward"]
        hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        with self._prompt_features(list(prompts["prompt_ids"]), batch_size) as features:
            fit = fit_value_head(
                features,  # this process's share of the prompts, on disk
                torch.tensor(targets, dtype=torch.float32),
                num_heads=self.args.value_num_heads,
                epochs=self.args.value_num_epochs,
                learning_rate=self.args.value_learning_rate,
                batch_size=self.args.value_batch_size,
                val_fraction=self.args.value_validation_fraction,
                seed=self.args.seed,
                device=self.accelerator.device,
                hidden_size=hidden_size,
                all_reduce=lambda tensor: self.accelerator.reduce(tensor, reduction="sum"),
            )
        # Every process took the same steps; on GPUs the last bits may still differ, so all use the first one's head
        state = broadcast_object_list([{k: v.cpu() for k, v in fit.head.state_dict().items()}], from_process=0)[0]
        fit.head.load_state_dict(state)
        self.value_head = fit.head
        self.precompute_metrics.update(
            {
                "value/num_prompts": float(len(rows)),
                "value/target_mean": float(torch.tensor(targets).mean()),
                "value/train_mse": fit.train_mse,
                "value/val_mse": fit.val_mse,
                "value/explained_variance": fit.explained_variance,
                "value/best_epoch": float(fit.best_epoch),
            }
        )
        logger.info(
            f"Value head fit on {len(rows)} prompts: train MSE {fit.train_mse:.4g}, validation MSE {fit.val_mse:.4g}, "
            f"explained variance {fit.explained_variance:.3f} (epoch {fit.best_epoch})."
        )
        return self._score_rows(dataset, batch_size, "train")

    def _load_value_head(self, state: str | dict) -> None:
        if isinstance(state, str):
            state = torch.load(state, map_location="cpu", weights_only=True)
        hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        self.value_head = AttentionPoolingValueHead(hidden_size, num_heads=self.args.value_num_heads)
        self.value_head.load_state_dict(state)
        self.value_head.eval()

    def _score_eval(self, dataset: Dataset, name: str) -> Dataset:
        fingerprint = Hasher.hash((dataset._fingerprint, self._scored_train._fingerprint, name, "alol-eval"))
        return self.cached_columns(
            dataset, fingerprint, lambda: self._score_rows(dataset, self._batch_size("eval"), name)
        )

    def _score_rows(self, dataset: Dataset, batch_size: int, name: str) -> dict[str, list]:
        """Every row's reference log-probability (`ref_logp`, and per token, `ref_logps`, for `"alol_seq"`), its
        `V_ref(x)` and `A = R - V_ref(x)`, from one reference forward per batch: the value head reads the prompt's
        hidden states of the same forward (causal attention: they are those of the prompt alone)."""
        per_token = self.args.loss_type == "alol_seq"
        rows = dataset.select_columns(["prompt_ids", "completion_ids"])

        def score(indices: list[int]) -> dict:
            batch = self.collate_rows(rows, indices)
            with self.reference_model() as model:
                logps, mask, hidden = self.reference_forward(model, batch, hidden_states=True)
                prompt_mask = (batch["attention_mask"] * (1 - batch["completion_mask"])).to(hidden.device)  # (B, T)
                values = self.value_head.to(hidden.device)(hidden, prompt_mask)  # (B,)
            scores = {"ref_logp": (logps * mask).sum(-1), "value": values}  # (B,) each
            if per_token:
                scores["ref_logps"] = [row[m.bool()] for row, m in zip(logps, mask)]
            return scores

        scored = self.map_rows(len(rows), score, batch_size, f"A-LoL: reference passes over the {name} rows")
        scored["advantage"] = [reward - value for reward, value in zip(dataset["reward"], scored["value"])]
        return scored

    def _prompt_hidden_states(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's last hidden states `(B, T, H)` over right-padded prompts, and their attention mask."""
        input_ids, attention_mask = self._pad_prompts(prompt_ids, "right")
        with self.reference_model() as model:
            hidden = self.backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, attention_mask

    def _prompt_features(self, prompt_ids: list[list[int]], batch_size: int) -> FeatureStore:
        """Each prompt's `(T_i, H)` hidden states, in the model's dtype, in a store on disk that holds the prompts
        this process computed: no process gathers the others' (see `fit_value_head`)."""
        store = FeatureStore()
        desc = "A-LoL: prompt features for the value head"
        for step in shard_batches(self.accelerator, len(prompt_ids), batch_size, desc, self.args.disable_tqdm):
            batch = [prompt_ids[i] for i in step.indices]
            hidden, _ = self._prompt_hidden_states(batch)  # every process runs every step: ZeRO-3 forwards line up
            for row, states, ids in list(zip(step.indices, hidden, batch))[: step.num_real]:
                store.add(row, states[: len(ids)])
        return store

    def _pad_prompts(self, prompt_ids: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [torch.tensor(p) for p in prompt_ids]
        input_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side=side)  # (B, T)
        attention_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side=side)  # (B, T)
        return input_ids.to(self.accelerator.device), attention_mask.to(self.accelerator.device)

    def _reference_greedy_rewards(self, prompts: Dataset, batch_size: int) -> list[float]:
        """Rewards of the reference's greedy answers to `prompts` (A-LoL's value targets), scored by `reward_funcs`
        with the prompt's other columns."""
        prompt_ids = list(prompts["prompt_ids"])
        completions = self.map_rows(
            len(prompt_ids),
            lambda indices: {"completion": self._greedy_completions([prompt_ids[i] for i in indices])},
            batch_size,
            "A-LoL: the reference's greedy answers for the value targets",
        )["completion"]
        conversational = isinstance(prompts[0]["prompt"], list)
        columns = [c for c in prompts.column_names if c not in _COMPLETION_COLUMNS and c != "prompt_ids"]
        generated = prompts.select_columns(columns).add_column(
            "completion",
            [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions,
        )
        return self.reward_funcs_scores(generated, "value-target")

    def _greedy_completions(self, prompt_ids: list[list[int]]) -> list[str]:
        input_ids, attention_mask = self._pad_prompts(prompt_ids, "left")
        with (
            self.reference_model() as model,
            # Under ZeRO-3, the weights are gathered once for the whole generation, as TRL's online trainers do
            unwrap_model_for_generation(model, self.accelerator) as unwrapped,
        ):
            generated = unwrapped.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.args.max_completion_length,
                do_sample=False,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        return self._tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here is prepared and scored like the ones given at construction
        if isinstance(eval_dataset, Dataset) and "advantage" not in eval_dataset.column_names:
            eval_dataset = self._score_eval(self.prepare_eval_dataset(eval_dataset), "eval")
            self.release_reference_engine()
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.priority_sampling:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return PriorityAdvantageSampler(dataset["advantage"], seed=self.args.seed)

    # -- training ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=input_ids,
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **self.policy_forward_kwargs(),
        )
        logps = outputs.log_probs[:, -(input_ids.shape[1] - 1) :]  # (B, T - 1); PEFT prompt tuning prepends tokens
        mask = completion_mask[:, 1:]  # (B, T - 1)
        # Per token for "alol_seq"; the other variants need only the sequence's log-probability
        ref_logps = inputs["ref_logps"] if "ref_logps" in inputs else inputs["ref_logp"]  # (B, T - 1) or (B,)
        per_sequence, metrics = alol_loss(
            logps,
            ref_logps.to(logps.dtype),
            mask,
            inputs["advantage"].to(logps.dtype),
            variant=self.args.loss_type,
            clip_epsilon=self.args.clip_epsilon,
            kl_coef=self.args.kl_coef,
        )  # (B,)
        loss = per_sequence.mean()  # the paper's batch mean over sequences; the Trainer divides by accumulation
        loss = self.add_aux_loss(loss, outputs, mode, len(per_sequence))

        trained = (inputs["advantage"] > 0).to(logps.dtype)  # (B,) the rows with a gradient
        rows = {
            "rows": torch.ones_like(trained),
            "trained_rows": trained,
            "advantage/mean": inputs["advantage"],
            "reward/mean": inputs["reward"],
            "value/mean": inputs["value"],
            "nll": metrics["nll"],
            "kl": metrics["kl"],
        }
        denominators = dict.fromkeys(("advantage/mean", "reward/mean", "value/mean", "nll", "kl"), "rows")
        if "importance_weight" in metrics:  # averaged over the rows that are trained on, whose weights matter
            rows["importance_weight/mean"] = metrics["importance_weight"] * trained
            rows["importance_weight/clip_fraction"] = metrics["clipped"] * trained
            denominators.update(
                dict.fromkeys(("importance_weight/mean", "importance_weight/clip_fraction"), "trained_rows")
            )
        self.log_row_metrics(mode, rows, denominators)
        if not return_outputs:
            return loss
        sequence_logps = (logps.detach() * mask).sum(-1)  # (B,)
        return loss, self.row_predictions(sequence_logps, inputs["ref_logp"], inputs["value"])
