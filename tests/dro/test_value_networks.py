import torch

from trl_offline.dro.value_networks import AdapterValueHead, PromptEndValueHead, PromptValueModel


def _value_model(path, seed=0):
    model = PromptValueModel.from_pretrained(path)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a trained-looking head: zero would hide every mistake
    return model.eval()


PROMPTS = [[5, 6, 7, 8], [9, 10]]


def test_value_model_starts_at_zero(tiny_model_path):
    model = PromptValueModel.from_pretrained(tiny_model_path)
    values = model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert values.tolist() == [0.0]


def test_value_model_reads_the_last_prompt_token_whatever_the_padding(tiny_model_path):
    model = _value_model(tiny_model_path)
    right = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        values = model(*right)
        torch.testing.assert_close(model(*left), values, atol=1e-5, rtol=1e-5)
        # By hand: the head on the body's last hidden state of each prompt alone
        for row, prompt in enumerate(PROMPTS):
            hidden = model.body(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
            torch.testing.assert_close(values[row], model.head(hidden).squeeze(), atol=1e-5, rtol=1e-5)
        # What comes after the prompt's end never matters: another pad id gives the same values
        torch.testing.assert_close(model(right[0].masked_fill(right[1] == 0, 3), right[1]), values)


def test_value_model_trains_body_and_head(tiny_model_path):
    model = _value_model(tiny_model_path)
    values = model(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long))
    values.sum().backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.body.embed_tokens.weight.grad.abs().sum() > 0


def test_value_model_saves_and_reloads(tiny_model_path, tmp_path):
    model = _value_model(tiny_model_path)
    batch = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").is_file() and (tmp_path / PromptValueModel.HEAD_FILE).is_file()
    reloaded = PromptValueModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(*batch), model(*batch))
    # A state dict given to save_pretrained (as gathered from ZeRO-3 shards) is what gets written
    state = {k: v + 1 if k == "head.bias" else v for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path / "given"), state_dict=state)
    with torch.no_grad():
        shifted = PromptValueModel.from_pretrained(str(tmp_path / "given")).eval()(*batch)
        torch.testing.assert_close(shifted, model(*batch) + 1)


def test_policy_feature_head_reads_the_last_prompt_token_detached(tmp_path):
    # Rows right-padded: the head reads position 1 of row 0 and position 2 of row 1, and no gradient reaches the
    # policy's hidden states (the value's loss must not train the policy's features)
    head = PromptEndValueHead(hidden_size=3)
    with torch.no_grad():
        head.head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        head.head.bias.fill_(0.5)
    hidden = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    values = head(hidden, mask)
    # row 0, position 1: [3, 4, 5] -> 3 + 8 + 15 + 0.5; row 1, position 2: [15, 16, 17] -> 15 + 32 + 51 + 0.5
    torch.testing.assert_close(values, torch.tensor([26.5, 98.5]))
    values.sum().backward()
    assert hidden.grad is None and head.head.weight.grad is not None

    head.save_pretrained(str(tmp_path))
    reloaded = PromptEndValueHead(hidden_size=3)
    reloaded.load_weights(str(tmp_path))
    torch.testing.assert_close(reloaded(hidden, mask), values)
    # The adapter variant reads the same position but lets the gradient through to the features
    through = AdapterValueHead(hidden_size=3, adapter_name="value")
    through.load_weights(str(tmp_path))
    through(hidden, mask).sum().backward()
    assert hidden.grad is not None and hidden.grad[0, 1].abs().sum() > 0 and hidden.grad[0, 2].abs().sum() == 0
