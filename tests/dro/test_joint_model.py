import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from trl_offline._trl_compat import add_fused_lm_head
from trl_offline.dro.joint_model import PolicyValueOutput, attach_value_model
from trl_offline.dro.value_networks import PromptEndValueHead, PromptValueModel


# Two rows, right-padded: prompts of 3 and 2 tokens, then 2 completion tokens each
INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def _policy(path, value_model):
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    add_fused_lm_head(policy)  # as the trainer has it: the value's hooks sit around TRL's patched forward
    attach_value_model(policy, value_model)
    return policy


def _random_head(value_model, seed=0):
    torch.manual_seed(seed)
    torch.nn.init.normal_(value_model.head.weight, std=0.5)  # zero would hide every mistake
    torch.nn.init.normal_(value_model.head.bias, std=0.5)
    return value_model


def _call(policy, **kwargs):
    labels = INPUT_IDS.masked_fill(PROMPT_MASK == 1, -100)
    return policy(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels, fused_lm_head=True, **kwargs)


def test_the_value_rides_on_hooks_around_the_policys_own_forward(tiny_model_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    add_fused_lm_head(policy)
    fused_forward = policy.forward
    head = _random_head(PromptEndValueHead(policy.config.hidden_size))
    attach_value_model(policy, head)
    assert policy.forward == fused_forward and policy.dro_value is head
    assert not policy._keys_to_ignore_on_save  # the trainer's `_save` leaves the value out, not the model

    with torch.no_grad():
        plain = _call(policy)
        joint = _call(policy, value_prompt_mask=PROMPT_MASK)
        hidden = policy.base_model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).last_hidden_state
    assert not isinstance(plain, PolicyValueOutput) and isinstance(joint, PolicyValueOutput)
    torch.testing.assert_close(joint.policy.log_probs, plain.log_probs, rtol=0, atol=0)
    # By hand: the head on the policy's last hidden state of each prompt's last token (positions 2 and 1)
    expected = head.head(torch.stack([hidden[0, 2], hidden[1, 1]])).squeeze(-1)
    torch.testing.assert_close(joint.prompt_values, expected)
    assert not policy.base_model._forward_hooks  # the hook that read the body's states is gone


def test_a_forward_that_raises_leaves_nothing_behind(tiny_model_path):
    policy = _policy(tiny_model_path, _random_head(PromptEndValueHead(8)))  # the wrong hidden size: the head raises
    with torch.no_grad(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _call(policy, value_prompt_mask=PROMPT_MASK)
    with torch.no_grad(), pytest.raises(IndexError, match="index out of range"):
        policy(input_ids=INPUT_IDS + 10_000, value_prompt_mask=PROMPT_MASK)  # raises inside the body
    assert not policy.base_model._forward_hooks
    with torch.no_grad():
        assert not isinstance(_call(policy), PolicyValueOutput)


def test_a_separate_value_network_runs_under_the_autocast_of_the_forward(tiny_model_path):
    value_model = _random_head(PromptValueModel(AutoModel.from_pretrained(tiny_model_path))).eval()
    policy = _policy(tiny_model_path, value_model)
    # accelerate's mixed precision wraps the model's `forward` in autocast, and hooks run outside `forward`
    policy.forward = torch.autocast("cpu", dtype=torch.bfloat16)(policy.forward)
    prompt_ids, prompt_mask = INPUT_IDS[:, :3], PROMPT_MASK[:, :3]  # cut to the longest prompt
    with torch.no_grad():
        values = _call(policy, value_prompt_mask=PROMPT_MASK).prompt_values
        full_precision = value_model(prompt_ids, prompt_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed_precision = value_model(prompt_ids, prompt_mask)
    assert values.dtype == torch.float32
    assert not torch.equal(mixed_precision, full_precision), "bf16 should round the tiny model's values"
    torch.testing.assert_close(values, mixed_precision, rtol=0, atol=0)
