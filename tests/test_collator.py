import torch

from trl_offline.collator import DataCollatorForRewardedCompletions


PAD = 0

# Row 0: prompt of 3 tokens, completion of 2; row 1: prompt of 1 token, completion of 3. Lengths 5 and 4.
EXAMPLES = [
    {
        "prompt_ids": [11, 12, 13],
        "completion_ids": [14, 15],
        "ref_logps": [-0.5, -1.5],
        "reward": 1,
        "advantage": 0.25,
    },
    {
        "prompt_ids": [21],
        "completion_ids": [22, 23, 24],
        "ref_logps": [-2.0, -3.0, -4.0],
        "reward": 0.5,
        "advantage": -1,
    },
]


def test_collator_pads_right_and_builds_the_masks():
    batch = DataCollatorForRewardedCompletions(pad_token_id=PAD)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_collator_places_ref_logps_where_the_previous_token_predicts_them():
    batch = DataCollatorForRewardedCompletions(pad_token_id=PAD)(EXAMPLES)
    # (B, T - 1): position t scores token t + 1, so the first completion token is scored at len(prompt_ids) - 1
    assert batch["ref_logps"].shape == (2, 4)
    assert batch["ref_logps"].tolist() == [[0.0, 0.0, -0.5, -1.5], [-2.0, -3.0, -4.0, 0.0]]
    # ... which are exactly the positions of the completion mask shifted by one
    assert torch.equal(batch["ref_logps"] != 0, batch["completion_mask"][:, 1:].bool())


def test_collator_stacks_the_per_row_floats():
    batch = DataCollatorForRewardedCompletions(pad_token_id=PAD)(EXAMPLES)
    assert batch["reward"].dtype == torch.float32 and batch["reward"].tolist() == [1.0, 0.5]
    assert batch["advantage"].dtype == torch.float32 and batch["advantage"].tolist() == [0.25, -1.0]
    assert "value" not in batch  # only what the rows carry


def test_collator_pads_to_a_multiple_and_needs_no_scores():
    rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["completion_ids"]} for e in EXAMPLES]
    batch = DataCollatorForRewardedCompletions(pad_token_id=PAD, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 14, 15, PAD, PAD, PAD]
    assert batch["completion_mask"][1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 4]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}

    with_ref = DataCollatorForRewardedCompletions(pad_token_id=PAD, pad_to_multiple_of=8)(EXAMPLES)
    assert with_ref["ref_logps"].shape == (2, 7)
    assert with_ref["ref_logps"][1, :3].tolist() == [-2.0, -3.0, -4.0]
    assert torch.count_nonzero(with_ref["ref_logps"][:, 4:]) == 0
