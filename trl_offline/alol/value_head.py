"""A-LoL's reference value `V_ref(x)` (Baheti et al. 2024, arXiv 2305.14718): a small head on the frozen reference
model's last hidden states of the prompt, fit with MSE before policy training; the advantage `A = R(x, y) - V_ref(x)`
then decides which rows are trained on. The trainer computes and caches the hidden states once; the head takes plain
tensors.
"""

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class AttentionPoolingValueHead(torch.nn.Module):
    """V(x) from a frozen LM's last hidden states over the prompt: multi-head attention pooling with a learned query
    (as in A-LoL's official code, 8 heads), then a linear layer to a scalar.

    Each head h scores every real token with its slice of a learned query against its slice of the keys, softmaxes
    over the prompt, and pools its slice of the values. This is `torch.nn.MultiheadAttention` with one learned query,
    computed without projecting every token: the query is folded into the key weights first (`q_h . W_k,h x_t =
    (W_k,h^T q_h) . x_t`) and the value projection is applied to each head's weighted average of the hidden states, so
    the cost per token is `num_heads * H` rather than `H^2`. Key and value biases are left out (a key bias shifts
    every score of a head equally, and attention weights sum to 1, so a value bias is a constant the readout bias
    already has), and so is MHA's output projection (a linear map right before the linear readout adds nothing).

    If `hidden_size` is not divisible by `num_heads`, the head uses the largest divisor of `hidden_size` not above
    `num_heads` (e.g. 6 heads for `hidden_size=12`); `self.num_heads` is the number used.

    Targets are standardised inside the head: the readout predicts `(V - target_mean) / target_std`, and `forward`
    returns `target_mean + target_std * raw`, with both buffers set by `fit_value_head` from the training targets.
    The official code bounds V with a sigmoid times a known task maximum instead; standardising works for rewards of
    any scale and sign and needs no such maximum. The readout starts at zero, so an untrained head predicts the mean.

    Computation is in float32 whatever the dtype of the features (bf16 hidden states are cast, autocast is off).
    """

    def __init__(self, hidden_size: int, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size and num_heads must be positive, got {hidden_size} and {num_heads}.")
        self.hidden_size = hidden_size
        self.num_heads = _largest_divisor_at_most(hidden_size, num_heads)
        self.head_dim = hidden_size // self.num_heads
        self.query = torch.nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.key = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = torch.nn.Dropout(dropout)  # on the attention weights, like torch.nn.MultiheadAttention
        self.readout = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.readout.weight)
        torch.nn.init.zeros_(self.readout.bias)
        self.register_buffer("target_mean", torch.tensor(0.0))
        self.register_buffer("target_std", torch.tensor(1.0))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, T, H)`): the prompt's last hidden states, any padding side.
            attention_mask (`torch.Tensor` of shape `(B, T)`): 1 for a real token, 0 for padding.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32: `V(x)` in the units of the targets.
        """
        return self.target_mean + self.target_std * self.standardised_value(hidden_states, attention_mask)

    def standardised_value(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(V(x) - target_mean) / target_std`, what the readout predicts and the fitting loss is measured on."""
        mask = attention_mask.bool()  # (B, T)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("Every prompt needs at least one real token (a row of attention_mask is all zeros).")
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            # Zeroed, padding cannot leak in even as NaN times a zero attention weight
            states = hidden_states.float().masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, T, H)
            nh, hd = self.num_heads, self.head_dim
            key_weight = self.key.weight.view(nh, hd, self.hidden_size)  # (nh, hd, H)
            # q_h . (W_k,h x_t) / sqrt(hd) = (W_k,h^T q_h / sqrt(hd)) . x_t: one scoring direction per head
            directions = torch.einsum("nd,ndh->nh", self.query.view(nh, hd), key_weight) / math.sqrt(hd)  # (nh, H)
            scores = torch.einsum("bth,nh->bnt", states, directions)  # (B, nh, T)
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
            weights = self.dropout(scores.softmax(dim=-1))  # (B, nh, T)
            pooled_states = torch.einsum("bnt,bth->bnh", weights, states)  # (B, nh, H)
            value_weight = self.value.weight.view(nh, hd, self.hidden_size)  # (nh, hd, H)
            pooled = torch.einsum("bnh,ndh->bnd", pooled_states, value_weight).flatten(1)  # (B, H)
            return self.readout(pooled).squeeze(-1)  # (B,)


def pad_features(
    features: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads per-prompt `(T_i, H)` hidden states into `(B, T, H)` and the matching `(B, T)` attention mask."""
    hidden_states = torch.nn.utils.rnn.pad_sequence([f.to(device) for f in features], batch_first=True)  # (B, T, H)
    lengths = torch.tensor([f.shape[0] for f in features], device=hidden_states.device)  # (B,)
    attention_mask = torch.arange(hidden_states.shape[1], device=hidden_states.device) < lengths.unsqueeze(1)  # (B, T)
    return hidden_states, attention_mask.long()


@torch.no_grad()
def predict_values(
    head: AttentionPoolingValueHead, features: Sequence[torch.Tensor], *, batch_size: int = 32
) -> torch.Tensor:
    """`V(x)` for each prompt's `(T_i, H)` hidden states, in eval mode; returns a float32 `(N,)` tensor on the CPU."""
    was_training = head.training
    head.eval()
    device = head.target_mean.device
    values = [
        head(*pad_features(features[start : start + batch_size], device)).cpu()
        for start in range(0, len(features), batch_size)
    ]
    head.train(was_training)
    return torch.cat(values) if values else torch.zeros(0)


@dataclass
class ValueFit:
    """What `fit_value_head` returns. Errors are in the units of the targets; `best_epoch` counts from 1 and its
    entry is `history[best_epoch - 1]`."""

    head: AttentionPoolingValueHead
    train_mse: float
    val_mse: float
    explained_variance: float  # on the validation split: 1 - val_mse / var(val targets); NaN if they are all equal
    best_epoch: int
    history: list[dict]  # per epoch: epoch, train_mse, val_mse


class _HeldFeatures:
    """Row-id access to the features a process holds: every row of a sequence, or the rows of a [`FeatureStore`]."""

    def __init__(self, features):
        self._features = features
        self.is_store = hasattr(features, "rows")
        self.rows = features.rows if self.is_store else list(range(len(features)))
        self._held = set(self.rows)

    def __contains__(self, row: int) -> bool:
        return row in self._held

    def __getitem__(self, row: int) -> torch.Tensor:
        return self._features[row]


def _check_inputs(held: _HeldFeatures, targets: torch.Tensor, val_fraction: float, hidden_size: int | None) -> int:
    """Checks the targets and the features this process holds; returns the hidden size."""
    if not held.rows and hidden_size is None:
        raise ValueError("fit_value_head got no prompts: `features` is empty.")
    whole = not held.is_store  # a sequence holds every row: one feature per target
    if targets.dim() != 1 or (whole and targets.shape[0] != len(held.rows)) or targets.shape[0] == 0:
        raise ValueError(
            f"fit_value_head needs one target per prompt: got {len(held.rows)} feature tensors and targets of shape "
            f"{tuple(targets.shape)}."
        )
    outside = [row for row in held.rows if not 0 <= row < targets.shape[0]]
    if outside:
        raise ValueError(
            f"fit_value_head needs one target per prompt: features of rows {outside[:10]} have no target among "
            f"{targets.shape[0]}."
        )
    bad = (~torch.isfinite(targets)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"Targets must be finite; rows {bad[:10]} are not (first: {targets[bad[0]].item()}).")
    hidden_size = hidden_size if hidden_size is not None else held[held.rows[0]].shape[-1]
    for row in held.rows:
        f = held[row]
        if f.dim() != 2 or f.shape[0] == 0:
            raise ValueError(f"Features of row {row} must have shape (T, H) with T >= 1, got {tuple(f.shape)}.")
        if f.shape[1] != hidden_size:
            raise ValueError(
                f"All features must have the same hidden size: expected {hidden_size}, row {row} has {f.shape[1]}."
            )
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"Features of row {row} contain non-finite values.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    return hidden_size


def _mean_squared_error(head, held: _HeldFeatures, rows: list[int], targets: torch.Tensor, batch_size: int, reduce):
    """The mean squared error of `head` over `rows` (all processes together): each process sums the rows it holds."""
    local = [row for row in rows if row in held]
    predictions = predict_values(head, [held[row] for row in local], batch_size=batch_size).double()  # (n_local,)
    total = (predictions - targets[local].double()).square().sum()
    return reduce(total.to(head.target_mean.device)).item() / len(rows)


def fit_value_head(
    features,
    targets: torch.Tensor,
    *,
    num_heads: int = 8,
    epochs: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
    hidden_size: int | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ValueFit:
    """Fits an `AttentionPoolingValueHead` to `targets` by MSE, with AdamW, keeping the epoch with the lowest
    validation MSE.

    A-LoL keeps the best of 5-10 epochs by training MSE; with a held-out split the validation MSE is the honest
    criterion. A seeded permutation holds out `round(val_fraction * N)` rows, at least one when `N >= 2` and
    `val_fraction > 0`, and always leaving one to train on. With `N == 1` or `val_fraction == 0` there is no held-out
    split: the "validation" metrics are computed on the training rows (the paper's criterion).

    The split, the initialisation and the batch order depend only on `seed` (bit for bit on the CPU), and the global
    RNG state is left as it was. `device` defaults to that of the first feature tensor.

    Data-parallel fitting: with `all_reduce` (a sum over processes), each process passes only the features it holds
    (a [`FeatureStore`] or any object with `rows` and `store[row]`) and every target. Every process then takes the
    same steps on the same global batches, each computing the squared errors of its own rows of a batch, and the
    summed gradients are divided by the global batch size: the same fit, up to the order of float additions, on any
    number of processes, with no process holding more than its share of the features.

    Args:
        features (sequence of `torch.Tensor` of shape `(T_i, H)`, or a store of some rows): one per prompt, its last
            hidden states.
        targets (`torch.Tensor` of shape `(N,)`): the value to regress, e.g. the reward of the reference's response.
        hidden_size (`int`, *optional*): needed when this process holds no feature.

    Returns:
        `ValueFit`, whose head (on `device`, in eval mode) carries the training targets' mean and standard deviation.
    """
    targets = torch.as_tensor(targets).detach().cpu().float()  # (N,)
    held = _HeldFeatures(features)
    hidden_size = _check_inputs(held, targets, val_fraction, hidden_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}.")
    reduce = all_reduce if all_reduce is not None else (lambda tensor: tensor)
    device = torch.device(device) if device is not None else held[held.rows[0]].device if held.rows else "cpu"
    device = torch.device(device)
    n = targets.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    num_val = min(max(1, round(val_fraction * n)), n - 1) if val_fraction > 0 else 0
    train_rows = order[num_val:]
    val_rows = order[:num_val] or train_rows
    train_targets, val_targets = targets[train_rows], targets[val_rows]  # (n_train,), (n_val,)

    cuda_devices = (
        [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        head = AttentionPoolingValueHead(hidden_size, num_heads=num_heads).to(device)
        mean, std = train_targets.mean().item(), train_targets.std(unbiased=False).item()
        std = std if std > 1e-12 else 1.0  # constant targets: nothing to scale
        head.target_mean.fill_(mean)
        head.target_std.fill_(std)
        # The loss is on the standardised scale, so the learning rate means the same for rewards of any scale
        standardised_targets = ((targets - mean) / std).to(device)  # (N,)
        parameters = list(head.parameters())
        for parameter in parameters:  # a process may hold no row of a batch: its gradient is then zero, not None
            parameter.grad = torch.zeros_like(parameter)
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)

        history, best_state, best_epoch = [], None, 0
        for epoch in range(1, epochs + 1):
            head.train()
            for batch in torch.randperm(len(train_rows), generator=generator).split(batch_size):
                rows = [train_rows[i] for i in batch.tolist()]
                local = [row for row in rows if row in held]
                optimizer.zero_grad(set_to_none=False)
                if local:
                    hidden_states, attention_mask = pad_features([held[row] for row in local], device)
                    predictions = head.standardised_value(hidden_states, attention_mask)  # (b_local,)
                    (predictions - standardised_targets[local]).square().sum().backward()
                # The mean over the global batch: every process's sum of squares, added up, over the batch size
                gradient = reduce(torch.cat([p.grad.flatten() for p in parameters])) / len(rows)
                offset = 0
                for parameter in parameters:
                    parameter.grad.copy_(gradient[offset : offset + parameter.numel()].view_as(parameter))
                    offset += parameter.numel()
                optimizer.step()
            train_mse = _mean_squared_error(head, held, train_rows, targets, batch_size, reduce)
            val_mse = _mean_squared_error(head, held, val_rows, targets, batch_size, reduce)
            history.append({"epoch": epoch, "train_mse": train_mse, "val_mse": val_mse})
            if math.isfinite(val_mse) and (best_state is None or val_mse < history[best_epoch - 1]["val_mse"]):
                best_state, best_epoch = copy.deepcopy(head.state_dict()), epoch
    if best_state is None:
        raise ValueError(f"The value head diverged (non-finite MSE every epoch); lower learning_rate={learning_rate}.")
    head.load_state_dict(best_state)
    head.eval()
    best = history[best_epoch - 1]
    val_variance = val_targets.double().var(unbiased=False).item()
    explained_variance = 1.0 - best["val_mse"] / val_variance if val_variance > 0 else math.nan
    return ValueFit(
        head=head,
        train_mse=best["train_mse"],
        val_mse=best["val_mse"],
        explained_variance=explained_variance,
        best_epoch=best["epoch"],
        history=history,
    )
