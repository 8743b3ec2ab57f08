"""How much GPU memory a cost script needs with every one of its trainers alive at once: the estimate that picks the
batch sizes in `costs.py`, recorded beside the peak the run then measures.

The model is a Llama of the cost run's shape, trained in bf16 mixed precision (fp32 weights, bf16 autocast), without
activation checkpointing, by AdamW. What `max_memory_allocated` has to hold is

- persistent, for every trainer alive (the scripts keep them all to alternate their steps): each trained model's fp32
  weights and two AdamW moments (12 bytes a parameter), each frozen copy's fp32 weights (4 bytes: KTO's reference, a
  LoRA trainer's base);
- plus, for the one trainer stepping, the most of: its fp32 gradients (4 bytes a trained parameter, freed by
  `zero_grad`), the bf16 weight copies autocast keeps through the backward (2 bytes a parameter) and the activations
  autograd saves.

The activations per token and layer, in bytes, are `20 h + 6 q + 6 kv + 8 i` (hidden `h`, query width `q`, key and
value width `kv` each, MLP width `i`): the fp32 residual stream and norm inputs, the bf16 projections, the rotated
queries and keys, the attention output (SDPA keeps no `T x T` scores) and the SwiGLU's three `i`-wide tensors. At
Qwen3-0.6B's shape that is 62 h = 63.5 KB; counting the bytes autograd saves (`torch.autograd.graph.
saved_tensors_hooks`) for one layer of that shape under bf16 autocast gave 77 h, the 15 h more being the layer's
bf16 weight copies spread over the 2,048 tokens. The LM head adds little: TRL's fused head, which every trainer here
uses, never holds the whole `(tokens, vocabulary)` logits. KTO's reference and KL passes run without gradients, so
they keep no activations.
"""

GIB = 2**30
FP32_TRAINED = 12  # bytes a trained parameter keeps between steps: fp32 weight + two AdamW moments
FP32_FROZEN = 4
GRADIENT = 4
BF16_COPY = 2


def parameter_count(sizes: dict) -> int:
    """Parameters of the Llama that `benchmarks/common.py`'s `build_cost_model` builds at `sizes` (a cost record's)."""
    h, layers, vocab = sizes["hidden"], sizes["layers"], sizes["vocab"]
    q, kv, i = _widths(sizes)
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * i
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = vocab * h * (1 if sizes.get("tie_word_embeddings") else 2)
    return embeddings + layers * per_layer + h  # the final norm


def activation_bytes_per_token(sizes: dict) -> int:
    """What autograd saves per token through the whole body (see the module docstring)."""
    q, kv, i = _widths(sizes)
    return sizes["layers"] * (20 * sizes["hidden"] + 6 * q + 6 * kv + 8 * i)


def _widths(sizes: dict) -> tuple[int, int, int]:
    head_dim = sizes.get("head_dim") or sizes["hidden"] // sizes["heads"]
    q = sizes["heads"] * head_dim
    kv = (sizes.get("kv_heads") or sizes["heads"]) * head_dim
    return q, kv, sizes.get("intermediate") or 2 * sizes["hidden"]


# Per trainer: models trained (full), frozen full copies, and whether a LoRA adapter is what trains (base frozen);
# `value_body` marks DRO's separate value network (a second trained body, run over the prompt only)
TRAINER_STATE = {
    "sft": dict(trained=1, frozen=0),
    "iqlearn": dict(trained=1, frozen=0),
    "alol": dict(trained=1, frozen=0),
    "kto": dict(trained=1, frozen=1),
    "dro": dict(trained=1, frozen=0, value_body=True),
    "dro_policy_head": dict(trained=1, frozen=0),
    "kto_lora": dict(trained=0, frozen=1),
    "dro_adapter": dict(trained=0, frozen=1),
}


def estimate_peak(sizes: dict, trainers: list[str]) -> dict:
    """The estimated `max_memory_allocated` of a cost run at `sizes` (with `batch_size`, `seq_len`, `prompt_len`)
    with `trainers` alive, in GiB, and its parts."""
    params = parameter_count(sizes)
    tokens = sizes["batch_size"] * sizes["seq_len"]
    prompt_tokens = sizes["batch_size"] * sizes["prompt_len"]
    per_token = activation_bytes_per_token(sizes)
    persistent, step = {}, {}
    for name in trainers:
        state = TRAINER_STATE[name]
        bodies = state["trained"] + (1 if state.get("value_body") else 0)
        persistent[name] = params * (FP32_TRAINED * bodies + FP32_FROZEN * state["frozen"])
        activations = per_token * tokens + (per_token * prompt_tokens if state.get("value_body") else 0)
        step[name] = params * (GRADIENT * bodies + BF16_COPY) + activations
    heaviest = max(step, key=step.get)
    total = sum(persistent.values()) + step[heaviest]
    return {
        "parameters": params,
        "activation_bytes_per_token": per_token,
        "persistent_gib": {name: b / GIB for name, b in persistent.items()},
        "heaviest_step": heaviest,
        "heaviest_step_gib": step[heaviest] / GIB,
        "peak_gib": total / GIB,
    }
