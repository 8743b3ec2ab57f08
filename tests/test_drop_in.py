"""The promise, run as a user would: a KTO user's script (QLoRA, a chat dataset with tools, `compute_metrics`, a
Mixture-of-Experts model) runs unchanged with `DROTrainer` and `ALoLTrainer` once the import and the config class
change; an SFT user's with `IQLearnTrainer`. Each script runs first with TRL's own trainer."""

import json

import pytest
import torch
from helpers import cpu_run_args
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.offline_kit import SORT_TOOL, make_dataset, make_scored_dataset
from trl_offline.quantization import keep_4bit_layers_differentiable


def _with_tools(dataset):
    return dataset.map(lambda row: {"tools": json.dumps([SORT_TOOL])})


def _user_script(trainer_class, config_class, model_path, output_dir, train_dataset, eval_dataset):
    """What the user runs: only the two classes change between TRL's trainer and ours."""
    args = config_class(**cpu_run_args(output_dir, max_steps=2, eval_strategy="steps", eval_steps=2))
    trainer = trainer_class(
        model=model_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=lambda prediction: {"rows": float(len(prediction.label_ids))},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    if trainer_class in (KTOTrainer, SFTTrainer):
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference in a no-grad forward, which breaks
        # TRL's own trainers in evaluation (a reshape error); ours turn that off, so it is turned off for TRL's too
        keep_4bit_layers_differentiable(trainer.model)
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    quantized = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.dtype == torch.uint8}
    trainer.train()
    return trainer, adapters, quantized


def _check_the_run(trainer, adapters, quantized, token_ids, num_eval_rows):
    assert trainer.state.global_step == 2
    evaluation = [log for log in trainer.state.log_history if "eval_rows" in log]
    assert evaluation and evaluation[-1]["eval_rows"] == num_eval_rows  # compute_metrics saw every evaluation row
    parameters = dict(trainer.model.named_parameters())
    assert quantized and all(torch.equal(parameters[n], before) for n, before in quantized.items())  # 4-bit base
    assert any(not torch.equal(parameters[n].float(), before.float()) for n, before in adapters.items())
    assert "sort_letters" in trainer.processing_class.decode(token_ids)  # the tools reached the chat template


@pytest.mark.parametrize(
    "trainer_class,config_class", [(KTOTrainer, KTOConfig), (DROTrainer, DROConfig), (ALoLTrainer, ALoLConfig)]
)
def test_a_kto_users_script_runs_unchanged(tmp_path, tiny_moe_bpe_model_path, trainer_class, config_class):
    train = _with_tools(make_scored_dataset("conversational_prompt_completion", 16, score="label"))
    evaluation = _with_tools(make_scored_dataset("conversational_prompt_completion", 8, seed=1, score="label"))
    trainer, adapters, quantized = _user_script(
        trainer_class, config_class, tiny_moe_bpe_model_path, tmp_path, train, evaluation
    )
    # A-LoL trains on the rows with a positive advantage only; every evaluation row is scored
    rows = trainer.eval_dataset if trainer_class is ALoLTrainer else trainer.train_dataset
    _check_the_run(trainer, adapters, quantized, rows[0]["prompt_ids"], len(evaluation))
    if trainer_class is not KTOTrainer:
        assert any(log.get("aux_loss", 0) > 0 for log in trainer.state.log_history)  # the MoE load-balancing loss


@pytest.mark.parametrize("trainer_class,config_class", [(SFTTrainer, SFTConfig), (IQLearnTrainer, IQLearnConfig)])
def test_an_sft_users_script_runs_unchanged(tmp_path, tiny_moe_bpe_model_path, trainer_class, config_class):
    train = _with_tools(make_dataset("conversational_language_modeling", 16))
    evaluation = _with_tools(make_dataset("conversational_language_modeling", 8, seed=1))
    trainer, adapters, quantized = _user_script(
        trainer_class, config_class, tiny_moe_bpe_model_path, tmp_path, train, evaluation
    )
    _check_the_run(trainer, adapters, quantized, trainer.train_dataset[0]["input_ids"], len(evaluation))
    assert any(log.get("aux_loss", 0) > 0 for log in trainer.state.log_history)
