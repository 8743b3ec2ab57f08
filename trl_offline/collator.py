"""The collator of the trainers that learn from scored responses (A-LoL, DRO)."""

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin

from ._trl_compat import pad


@dataclass
class DataCollatorForRewardedCompletions(DataCollatorMixin):
    """Right-pads tokenized `prompt_ids` + `completion_ids` rows into `input_ids`, `attention_mask` and
    `completion_mask` (1 on completion tokens), like TRL's `DataCollatorForUnpairedPreference`, and stacks the
    per-row floats that are present (`reward`, `value`, `advantage`, and `ref_logp`, a sequence's reference
    log-probability).

    Per-token reference log-probabilities (`ref_logps`, one per completion token) are placed where the fused LM head
    puts the policy's: `(B, T - 1)`, position `t` scoring token `t + 1`, zero elsewhere.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(e["prompt_ids"] + e["completion_ids"]) for e in examples]
        masks = [torch.tensor([0] * len(e["prompt_ids"]) + [1] * len(e["completion_ids"])) for e in examples]
        kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        output = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, **kwargs),  # (B, T)
            "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, **kwargs),  # (B, T)
            "completion_mask": pad(masks, padding_value=0, **kwargs),  # (B, T)
        }
        if "ref_logps" in examples[0]:
            ref_logps = torch.zeros(len(examples), output["input_ids"].shape[1] - 1)  # (B, T - 1)
            for row, example in enumerate(examples):
                start = len(example["prompt_ids"]) - 1  # the last prompt token predicts the first completion token
                ref_logps[row, start : start + len(example["ref_logps"])] = torch.tensor(example["ref_logps"])
            output["ref_logps"] = ref_logps
        for key in ("reward", "value", "advantage", "ref_logp"):
            if key in examples[0]:
                output[key] = torch.tensor([float(e[key]) for e in examples])  # (B,)
        return output
