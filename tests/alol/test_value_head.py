import math

import pytest
import torch

from trl_offline.alol.value_head import AttentionPoolingValueHead, fit_value_head, pad_features, predict_values


HIDDEN = 16


def _prompts(n: int, seed: int, noise: float = 0.05):
    """Prompts of 3-12 tokens whose target is the token mean of a fixed projection of the features, plus noise."""
    projection = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1234))  # the same for every split
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=generator).tolist()
    features = [torch.randn(length, HIDDEN, generator=generator) for length in lengths]
    signal = torch.stack([(f @ projection).mean() for f in features])  # (n,)
    return features, signal + noise * signal.std() * torch.randn(n, generator=generator)


def _explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    return 1.0 - (predictions - targets).square().mean().item() / targets.var(unbiased=False).item()


@pytest.fixture(scope="module")
def data():
    return _prompts(300, seed=0)


@pytest.fixture(scope="module")
def fit(data):
    return fit_value_head(*data, num_heads=4, epochs=10, learning_rate=1e-2)


def _random_head(num_heads: int = 4) -> AttentionPoolingValueHead:
    torch.manual_seed(0)
    head = AttentionPoolingValueHead(HIDDEN, num_heads=num_heads)
    torch.nn.init.normal_(head.readout.weight)  # the readout starts at zero, which would make every V equal
    torch.nn.init.normal_(head.query, std=1.0)  # peaked attention, so the masking matters
    return head.eval()


def test_fit_explains_a_known_function_of_the_prompt(data, fit):
    # The noise is 5% of the signal's std, so the best reachable explained variance is about 1 - 0.05^2 = 0.9975
    assert fit.explained_variance > 0.95
    assert fit.val_mse < 0.05 * data[1].var().item()
    # On fresh prompts from the same distribution, the head generalises; predicting the training mean explains nothing
    test_features, test_targets = _prompts(200, seed=1)
    assert _explained_variance(predict_values(fit.head, test_features), test_targets) > 0.95
    mean_prediction = torch.full_like(test_targets, data[1].mean().item())
    assert abs(_explained_variance(mean_prediction, test_targets)) < 0.05


def test_standardisation_makes_the_fit_scale_free(data, fit):
    features, targets = data
    scaled = fit_value_head(features, 1000.0 * targets - 500.0, num_heads=4, epochs=10, learning_rate=1e-2)
    assert scaled.explained_variance == pytest.approx(fit.explained_variance, abs=1e-3)
    assert scaled.best_epoch == fit.best_epoch
    torch.testing.assert_close(scaled.head.target_mean, 1000.0 * fit.head.target_mean - 500.0, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(scaled.head.target_std, 1000.0 * fit.head.target_std, rtol=1e-4, atol=0.0)


def test_the_best_epoch_by_validation_mse_is_kept():
    # Few noisy rows and a large learning rate overfit, so the last epoch is not the best
    features, targets = _prompts(40, seed=2, noise=1.0)
    fit = fit_value_head(features, targets, num_heads=4, epochs=12, learning_rate=3e-2, val_fraction=0.25)
    val_mses = [entry["val_mse"] for entry in fit.history]
    assert [entry["epoch"] for entry in fit.history] == list(range(1, 13))
    assert fit.best_epoch < 12, "this data should overfit; otherwise the test checks nothing"
    assert fit.val_mse == min(val_mses) == fit.history[fit.best_epoch - 1]["val_mse"]
    assert fit.train_mse == fit.history[fit.best_epoch - 1]["train_mse"]
    # The returned weights are those of the best epoch: over all 40 rows (30 train, 10 val) they reproduce its MSEs
    all_mse = (predict_values(fit.head, features) - targets).square().mean().item()
    assert all_mse == pytest.approx((30 * fit.train_mse + 10 * fit.val_mse) / 40, rel=1e-4)


def test_fit_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(data):
    features, targets = data[0][:60], data[1][:60]
    rng_state = torch.random.get_rng_state()
    first = fit_value_head(features, targets, epochs=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    second = fit_value_head(features, targets, epochs=2, seed=3)
    other = fit_value_head(features, targets, epochs=2, seed=4)
    assert first.history == second.history
    for name, tensor in first.head.state_dict().items():
        assert torch.equal(tensor, second.head.state_dict()[name]), name
    assert first.history != other.history


def test_tiny_inputs_split_or_validate_on_train(data):
    features, targets = data
    one = fit_value_head(features[:1], targets[:1], epochs=1)  # no split possible: validated on the training row
    assert one.val_mse == one.train_mse
    assert math.isnan(one.explained_variance)  # a single target has no variance
    two = fit_value_head(features[:2], targets[:2], epochs=1)  # one row each
    assert two.val_mse != two.train_mse


def test_padding_never_influences_the_value():
    head = _random_head()
    torch.manual_seed(1)
    lengths = [5, 2, 7]
    features = [torch.randn(length, HIDDEN) for length in lengths]
    hidden_states, attention_mask = pad_features(features)  # right padding, (3, 7, H)
    values = head(hidden_states, attention_mask)  # (3,)

    garbage = hidden_states.clone()
    garbage[attention_mask == 0] = torch.randn(int((attention_mask == 0).sum()), HIDDEN) * 100.0
    garbage[0, -1] = float("nan")
    torch.testing.assert_close(head(garbage, attention_mask), values, rtol=0, atol=0)

    left_states = torch.zeros_like(hidden_states)
    left_mask = torch.zeros_like(attention_mask)
    for row, f in enumerate(features):
        left_states[row, -len(f) :] = f
        left_mask[row, -len(f) :] = 1
    torch.testing.assert_close(head(left_states, left_mask), values)

    # Each row alone, unpadded, gives the same value as in the padded batch
    alone = torch.cat([head(f.unsqueeze(0), torch.ones(1, len(f))) for f in features])
    torch.testing.assert_close(alone, values)


def test_head_is_multi_head_attention_pooling_with_a_learned_query():
    head = _random_head(num_heads=4)
    mha = torch.nn.MultiheadAttention(HIDDEN, 4, bias=False, batch_first=True)
    identity = torch.eye(HIDDEN)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([identity, head.key.weight, head.value.weight]))
        mha.out_proj.weight.copy_(identity)
    mha.eval()
    torch.manual_seed(2)
    hidden_states, attention_mask = pad_features([torch.randn(length, HIDDEN) for length in [6, 3, 4]])
    query = head.query.expand(3, 1, HIDDEN)  # (B, 1, H)
    pooled, _ = mha(query, hidden_states, hidden_states, key_padding_mask=attention_mask == 0)  # (B, 1, H)
    torch.testing.assert_close(head(hidden_states, attention_mask), head.readout(pooled[:, 0]).squeeze(-1))


def test_bf16_features_are_computed_in_float32():
    head = _random_head()
    torch.manual_seed(3)
    hidden_states, attention_mask = pad_features([torch.randn(4, HIDDEN), torch.randn(2, HIDDEN)])
    bf16 = hidden_states.bfloat16()
    values = head(bf16, attention_mask)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, head(bf16.float(), attention_mask), rtol=0, atol=0)


@pytest.mark.parametrize("hidden_size,requested,used", [(16, 8, 8), (12, 8, 6), (7, 8, 7), (13, 8, 1), (4, 8, 4)])
def test_heads_fall_back_to_the_largest_divisor(hidden_size, requested, used):
    head = AttentionPoolingValueHead(hidden_size, num_heads=requested)
    assert head.num_heads == used and head.head_dim * used == hidden_size
    assert head(torch.randn(2, 3, hidden_size), torch.ones(2, 3)).shape == (2,)


def test_untrained_head_predicts_the_mean():
    head = AttentionPoolingValueHead(HIDDEN)
    head.target_mean.fill_(2.5)
    torch.testing.assert_close(head(torch.randn(3, 4, HIDDEN), torch.ones(3, 4)), torch.full((3,), 2.5))


def test_all_padding_row_is_an_error():
    with pytest.raises(ValueError, match="at least one real token"):
        AttentionPoolingValueHead(HIDDEN)(torch.randn(2, 3, HIDDEN), torch.tensor([[1, 1, 0], [0, 0, 0]]))


@pytest.mark.parametrize(
    "features,targets,match",
    [
        ([], torch.zeros(0), "empty"),
        ([torch.randn(3, HIDDEN)] * 3, torch.zeros(2), "one target per prompt"),
        ([torch.randn(3, HIDDEN)] * 2, torch.tensor([0.0, float("nan")]), r"finite; rows \[1\]"),
        ([torch.randn(3, HIDDEN)] * 2, torch.tensor([float("inf"), 0.0]), r"finite; rows \[0\]"),
        ([torch.randn(3, HIDDEN), torch.randn(3, HIDDEN + 1)], torch.zeros(2), "same hidden size"),
        ([torch.randn(3, HIDDEN), torch.randn(0, HIDDEN)], torch.zeros(2), r"row 1 must have shape \(T, H\)"),
        ([torch.randn(3, HIDDEN), torch.full((2, HIDDEN), float("nan"))], torch.zeros(2), "row 1 contain non-finite"),
    ],
)
def test_bad_inputs_are_clear_errors(features, targets, match):
    with pytest.raises(ValueError, match=match):
        fit_value_head(features, targets)
