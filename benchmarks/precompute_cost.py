"""Wall time and peak memory of what `ALoLTrainer` and `DROTrainer` compute before their first training step, side by
side with the limit: a plain no-grad forward pass of the same model over the same rows, at the same batch size.

Rows: the offline kit's `make_scored_dataset("prompt_completion", --rows)` (sorting prompts such as "cab=" with answers
of mixed quality and a float `reward`), about 11 tokens each with the kit's character-level tokenizer (eos included).
Model: the kit's random Llama (`build_cost_model`; 4 layers, hidden 256, vocabulary 32000 by default, so the LM head
dominates a forward), float32. Trainers are built from the model's path with `use_cpu` (on CPU), `bf16=False`, no
trackers, checkpoints, progress bars or activation checkpointing, and `precompute_ref_batch_size=--batch-size`.

Each part runs in a fresh process, one after the other (the model is built in one too), and times:

- `forward`, the limit: the rows tokenized as the trainers tokenize them and collated in order by their collator (right
  padding to a batch's longest row), labels = input_ids with -100 off the completion, all before the clock starts;
  then `model(input_ids=, attention_mask=, labels=, fused_lm_head=True)` (TRL's fused LM head, added with
  `add_fused_lm_head` as the trainers do) over every batch under `torch.no_grad()` in eval mode, after one untimed
  warm-up batch.
- `alol`: the whole `ALoLTrainer(model_path, args=ALoLConfig(...), train_dataset=rows)` without `reward_funcs` (the
  value head is fit on the rows' own rewards, `value_num_prompts=--value-num-prompts`), and apart, by wrapping the
  methods of a subclass: `_load_model`; `_prepare_dataset` (tokenisation); the value head = `_value_prompt_rows`
  (picking the prompts) + `_prompt_features` (reference forwards over them, stored on disk in a `FeatureStore`) + the
  fit (the rest of `_fit_value_and_score`: `fit_value_head` and its bookkeeping); `_score_rows`, the scoring pass (one
  reference forward per batch over every row, the value head reading the same forward's hidden states); `other`, the
  rest (`Trainer` set-up, fingerprints, keeping the positive rows). The precompute = value head + scoring pass. Run at
  `--rows` and at `--rows // 4` (`alol_quarter`), to show whether its memory grows with the rows.
- `dro`: the whole `DROTrainer` (`precompute_ref_log_probs=True`, `value_network="policy_head"`: no copy of the model),
  and apart `_load_model`, `_prepare_dataset` and `_with_reference_logps` (the reference pass).
- `generation`: `ALoLTrainer` with `reward_funcs=sort_reward_func` on `2 * --generation-prompts` unscored rows,
  `value_num_prompts=--generation-prompts`, `max_completion_length=--max-completion-length`; apart, its
  `_reference_greedy_rewards` (A-LoL's value targets: greedy answers and their rewards) and `_greedy_completions`
  (generation alone), the generated tokens (new positions that are not padding) counted from `generate`'s output.

Ratios are seconds over the limit's seconds on the same rows: A-LoL's precompute (the goal: at most 1.3x) and its whole
constructor, DRO's reference pass and its whole constructor.

Memory: in each part's process, the rise of the peak resident set size (`ru_maxrss`) over the RSS right after the model
and the rows are loaded (for a trainer, when `_load_model` returns; its rows were built before). On CPU the parts are
forked from this process once it has imported the libraries (about 7 s of CPU, paid once) and before it loads anything
else: a child starts with its parent's peak RSS, so this process never loads a model. On CUDA they are spawned, and
each part's `max_memory_allocated` (weights included) is recorded too. `new_peak: false` says a part never rose above
the peak its process had already reached, so its number is an upper bound.

    python benchmarks/precompute_cost.py            # 20,000 rows (~10 min on 2 CPU cores); writes results/
    python benchmarks/precompute_cost.py --quick    # 300 rows, tiny model, seconds (no JSON unless --output)
"""

import argparse
import functools
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import build_cost_model, current_rss_bytes, peak_rss_bytes, provenance, write_json


MIB = 2**20
GOAL = 1.3  # A-LoL's precompute (value head + scoring pass) over the forward pass, at most
SECONDS = defaultdict(float)  # in a part's process: wall seconds per wrapped trainer method
MARK = {}  # in a part's process: RSS and peak RSS right after the model and the rows are loaded
SIZES = ("vocab", "hidden", "layers", "heads", "rows", "batch_size", "value_num_prompts", "generation_prompts")
SIZES += ("max_completion_length",)


# -- in a part's process ----------------------------------------------------------------------------------------------


def _mark() -> None:
    MARK.update(rss=current_rss_bytes(), peak=peak_rss_bytes())


def _memory(device: str) -> dict:
    peak = peak_rss_bytes()
    memory = {"baseline_mib": MARK["rss"] / MIB, "peak_mib": peak / MIB, "new_peak": peak > MARK["peak"]}
    memory["peak_increase_mib"] = (peak - MARK["rss"]) / MIB
    if device.startswith("cuda"):
        memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return memory


def _timer(method):
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        tic = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            SECONDS[method.__name__] += time.perf_counter() - tic

    return timed


def _timed(trainer_class, names: tuple[str, ...]):
    """A subclass of `trainer_class` whose methods `names` and `_load_model` add their wall time to `SECONDS`; the
    memory baseline is taken when `_load_model` returns."""

    def _load_model(self, *args, **kwargs):
        loaded = _timer(trainer_class._load_model)(self, *args, **kwargs)
        _mark()
        return loaded

    methods = {name: _timer(getattr(trainer_class, name)) for name in names}
    return type(f"Timed{trainer_class.__name__}", (trainer_class,), {**methods, "_load_model": _load_model})


def _rows(args, num_rows: int, score: str = "reward"):
    from trl_offline.offline_kit import make_scored_dataset

    return make_scored_dataset("prompt_completion", num_rows, seed=args.seed, score=score)


def _build(trainer_class, config_class, args, dataset, reward_funcs=None, **fields):
    """`trainer_class(model_path, args=config_class(...), train_dataset=dataset)` and the seconds it took."""
    with tempfile.TemporaryDirectory() as root:
        config = config_class(
            output_dir=root, per_device_train_batch_size=args.batch_size, precompute_ref_batch_size=args.batch_size,
            use_cpu=args.device == "cpu", bf16=False, gradient_checkpointing=False, report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=args.seed, **fields,
        )  # fmt: skip
        tic = time.perf_counter()
        trainer = trainer_class(args.model_path, args=config, train_dataset=dataset, reward_funcs=reward_funcs)
        return trainer, time.perf_counter() - tic


def _num_tokens(dataset) -> int:
    return sum(len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"]))


def _tokenize(tokenizer, row: dict) -> dict:
    """A plain prompt + completion row as `trl_offline.tokenization.tokenize_row` tokenizes it."""
    from trl.data_utils import common_prefix_length

    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    full_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
    start = common_prefix_length(prompt_ids, full_ids)
    return {"prompt_ids": prompt_ids[:start], "completion_ids": full_ids[start:]}


def part_forward(args) -> dict:
    """The limit: a no-grad forward with TRL's fused LM head over pre-collated batches of the same rows."""
    from transformers import AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head, create_model_from_path

    from trl_offline.collator import DataCollatorForRewardedCompletions

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = create_model_from_path(args.model_path).to(args.device).eval()
    add_fused_lm_head(model)
    rows = [_tokenize(tokenizer, row) for row in _rows(args, args.rows)]
    collate, size, batches = DataCollatorForRewardedCompletions(tokenizer.pad_token_id), args.batch_size, []
    for batch in (collate(rows[i : i + size]) for i in range(0, len(rows), size)):
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # (B, T)
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        batches.append({key: value.to(args.device) for key, value in batch.items()})
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    _mark()
    with torch.no_grad():
        model(**batches[0], fused_lm_head=True)  # warm-up: kernels, thread pools
        sync()
        tic = time.perf_counter()
        for batch in batches:
            model(**batch, fused_lm_head=True)
        sync()
        seconds = time.perf_counter() - tic
    tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    return {"rows": len(rows), "tokens": tokens, "seconds": seconds, "rows_per_second": len(rows) / seconds}


def part_alol(args) -> dict:
    """`ALoLTrainer` on the rows, its value head fit on their rewards; its phases apart."""
    from trl_offline import ALoLConfig, ALoLTrainer

    names = ("_prepare_dataset", "_value_prompt_rows", "_prompt_features", "_fit_value_and_score", "_score_rows")
    trainer, total = _build(_timed(ALoLTrainer, names), ALoLConfig, args, _rows(args, args.rows),
                            value_num_prompts=args.value_num_prompts)  # fmt: skip
    s = SECONDS
    phases = {"load_model": s["_load_model"], "tokenise": s["_prepare_dataset"]}
    phases.update(value_prompt_rows=s["_value_prompt_rows"], prompt_features=s["_prompt_features"])
    phases["value_fit"] = s["_fit_value_and_score"] - sum(phases[k] for k in ("value_prompt_rows", "prompt_features"))
    phases["value_fit"] -= s["_score_rows"]  # the rest of `_fit_value_and_score`
    phases["scoring_pass"] = s["_score_rows"]
    phases["other"] = total - sum(phases.values())
    value_head = phases["value_prompt_rows"] + phases["prompt_features"] + phases["value_fit"]
    precompute, rows = value_head + phases["scoring_pass"], len(trainer._scored_train)
    return {
        "rows": rows, "positive_rows": len(trainer.train_dataset), "tokens": _num_tokens(trainer._scored_train),
        "seconds": total, "rows_per_second": rows / total, "phases": phases, "value_head_seconds": value_head,
        "precompute_seconds": precompute, "precompute_rows_per_second": rows / precompute,
        "scoring_pass_rows_per_second": rows / phases["scoring_pass"],
        "precompute_metrics": dict(trainer.precompute_metrics),
    }  # fmt: skip


def part_dro(args) -> dict:
    """`DROTrainer` on the rows, its reference log-probabilities precomputed; its phases apart."""
    from trl_offline import DROConfig, DROTrainer

    trainer_class = _timed(DROTrainer, ("_prepare_dataset", "_with_reference_logps"))
    trainer, total = _build(trainer_class, DROConfig, args, _rows(args, args.rows), value_network="policy_head",
                            precompute_ref_log_probs=True)  # fmt: skip
    phases = {"load_model": SECONDS["_load_model"], "tokenise": SECONDS["_prepare_dataset"]}
    phases["reference_pass"] = SECONDS["_with_reference_logps"]
    phases["other"] = total - sum(phases.values())
    rows = len(trainer.train_dataset)
    return {
        "rows": rows, "tokens": _num_tokens(trainer.train_dataset), "seconds": total, "rows_per_second": rows / total,
        "phases": phases, "reference_pass_rows_per_second": rows / phases["reference_pass"],
    }  # fmt: skip


def part_generation(args) -> dict:
    """`ALoLTrainer` with `reward_funcs`: the reference's greedy answers for the value targets, timed apart."""
    from trl_offline import ALoLConfig, ALoLTrainer
    from trl_offline.offline_kit import sort_reward_func

    counts = {"prompts": 0, "generated_tokens": 0, "decoded_positions": 0}

    class Trainer(_timed(ALoLTrainer, ("_reference_greedy_rewards", "_greedy_completions"))):
        def _greedy_completions(self, prompt_ids):
            model = self.accelerator.unwrap_model(self.model)  # what `unwrap_model_for_generation` yields here
            generate = model.generate

            def counted(*args, **kwargs):
                output = generate(*args, **kwargs)
                new = output[:, kwargs["input_ids"].shape[1] :]  # (B, new positions)
                counts["decoded_positions"] += new.numel()
                counts["generated_tokens"] += int((new != kwargs["pad_token_id"]).sum())  # padding after eos
                return output

            model.generate = counted
            try:
                counts["prompts"] += len(prompt_ids)
                return super()._greedy_completions(prompt_ids)
            finally:
                del model.generate

    dataset = _rows(args, 2 * args.generation_prompts, score="none")
    trainer, total = _build(Trainer, ALoLConfig, args, dataset, reward_funcs=sort_reward_func,
                            value_num_prompts=args.generation_prompts,
                            max_completion_length=args.max_completion_length)  # fmt: skip
    seconds, rows = SECONDS["_greedy_completions"], len(trainer._scored_train)
    return {
        "rows": rows, "seconds": total, "rows_per_second": rows / total, **counts,
        "max_completion_length": args.max_completion_length, "generation_seconds": seconds,
        "value_targets_seconds": SECONDS["_reference_greedy_rewards"],
        "tokens_per_second": counts["generated_tokens"] / seconds,
    }  # fmt: skip


PARTS = {"forward": part_forward, "alol": part_alol, "dro": part_dro, "generation": part_generation}


def run_part(args, writer) -> None:
    """In a part's process: sends the part's record, with its memory, to the parent."""
    if args.part == "build":
        return writer.send(build_cost_model(os.path.dirname(args.model_path), args))
    record = PARTS[args.part](args)
    writer.send({**record, "memory": _memory(args.device)})


# -- in the parent ----------------------------------------------------------------------------------------------------


def _run_part(part: str, args, model_path: str, **overrides) -> dict:
    """`part` in a fresh process, forked on CPU and spawned on CUDA (a fork cannot use CUDA); returns its record."""
    print(f"{part} ({overrides.get('rows', args.rows)} rows) ...", flush=True)
    part_args = argparse.Namespace(**{**vars(args), **overrides, "part": part, "model_path": model_path})
    context = multiprocessing.get_context("fork" if args.device == "cpu" else "spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=run_part, args=(part_args, writer))
    process.start()
    writer.close()
    try:
        record = reader.recv()
    except EOFError:  # it failed; its traceback is on stderr
        record = None
    process.join()
    if record is None or process.exitcode != 0:
        raise RuntimeError(f"The {part} part failed (exit code {process.exitcode}).")
    return record


def plot(record: dict, path: str) -> None:
    """Rows per second of each part, and each part's peak memory increase, labelled with the machine and sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts, alol, dro = record["parts"], record["parts"]["alol"], record["parts"]["dro"]
    speeds = {
        "forward (limit)": parts["forward"]["rows_per_second"], "A-LoL precompute": alol["precompute_rows_per_second"],
        "A-LoL constructor": alol["rows_per_second"], "DRO reference pass": dro["reference_pass_rows_per_second"],
        "DRO constructor": dro["rows_per_second"],
    }  # fmt: skip
    memory = {f"{name}\n{part['rows']} rows": part["memory"]["peak_increase_mib"] for name, part in parts.items()}
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    speed_ax.bar(list(speeds), list(speeds.values()), color="#4c72b0")
    speed_ax.set_ylabel(f"rows per second ({record['sizes']['rows']} rows)")
    tokens_per_second = parts["generation"]["tokens_per_second"]
    speed_ax.set_title(f"greedy generation for A-LoL's value targets: {tokens_per_second:.0f} tokens/s", fontsize=9)
    memory_ax.bar(list(memory), list(memory.values()), color="#dd8452")
    memory_ax.set_ylabel("peak RSS increase over model + rows loaded, MiB")
    for ax in (speed_ax, memory_ax):
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    m, s = record["machine"], record["sizes"]
    device = m["device"] if m["device"] != "cpu" else f"CPU, {m['cpu_count']} cores"
    fig.suptitle(f"{device}, torch {m['torch']}, TRL {m['trl']}: {s['layers']} layers, hidden {s['hidden']}, vocab "
                 f"{s['vocab']}, batch {s['batch_size']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _print_table(record: dict) -> None:
    parts = record["parts"]
    print(f"\n{record['sizes']}\n{'part':<14}{'rows':>7}{'seconds':>10}{'rows/s':>10}{'peak +MiB':>11}")
    for name, part in parts.items():
        flag = "" if part["memory"]["new_peak"] else "  (no new peak: an upper bound)"
        print(f"{name:<14}{part['rows']:>7}{part['seconds']:>10.2f}{part['rows_per_second']:>10.1f}"
              f"{part['memory']['peak_increase_mib']:>11.1f}{flag}")  # fmt: skip
    print("(alol, dro, generation: the whole trainer constructor)")
    for name in ("alol", "dro"):
        print(f"{name} phases, s: " + ", ".join(f"{k} {v:.2f}" for k, v in parts[name]["phases"].items()))
    g = parts["generation"]
    print(f"generation: {g['generated_tokens']} tokens for {g['prompts']} prompts in {g['generation_seconds']:.2f} s, "
          f"{g['tokens_per_second']:.0f} tokens/s")  # fmt: skip
    verdict = f" (goal <= {GOAL}x: {'met' if record['goal']['met'] else 'MISSED'})"
    for key, ratio in record["ratios"].items():
        print(f"{key} / forward: {ratio['ratio']:.3f}x" + (verdict if key == "alol_precompute" else ""))


def run(args) -> None:
    start = time.perf_counter()
    if args.device == "cpu":  # once, here, for every forked part
        import trl_offline.offline_kit  # noqa: F401
    with tempfile.TemporaryDirectory() as root:
        model_path = os.path.join(root, "model")
        _run_part("build", args, model_path)  # not here: this process must stay small (see the docstring)
        parts = {name: _run_part(name, args, model_path) for name in ("forward", "alol")}
        parts["alol_quarter"] = _run_part("alol", args, model_path, rows=args.rows // 4)
        parts.update({name: _run_part(name, args, model_path) for name in ("dro", "generation")})
    forward, alol, dro = parts["forward"], parts["alol"], parts["dro"]
    seconds = {"alol_precompute": alol["precompute_seconds"], "alol_construction": alol["seconds"]}
    seconds.update(dro_reference_pass=dro["phases"]["reference_pass"], dro_construction=dro["seconds"])
    limit = forward["seconds"]
    ratios = {k: {"precompute_seconds": v, "forward_seconds": limit, "ratio": v / limit} for k, v in seconds.items()}
    record = {
        "benchmark": "before the first training step: A-LoL's and DRO's precompute vs a plain no-grad forward pass",
        **provenance(args.device),
        "sizes": {**{k: getattr(args, k) for k in SIZES}, "alol_quarter_rows": args.rows // 4},
        "timed": "see the docstring of benchmarks/precompute_cost.py; alol, dro, generation: seconds = constructor",
        "memory_method": "fresh process per part; ru_maxrss increase over RSS right after model and rows are loaded",
        "parts": parts,
        "ratios": ratios,
        "goal": {"alol_precompute_at_most": GOAL, "met": ratios["alol_precompute"]["ratio"] <= GOAL},
        "memory_vs_rows": {
            "alol_rows": [parts["alol_quarter"]["rows"], alol["rows"]],
            "alol_peak_increase_mib": [parts[n]["memory"]["peak_increase_mib"] for n in ("alol_quarter", "alol")],
            "forward_peak_increase_mib": forward["memory"]["peak_increase_mib"],
        },
        "wall_seconds": time.perf_counter() - start,
    }
    _print_table(record)
    if args.output:
        write_json(args.output, record)
        plot(record, str(Path(args.output).with_suffix(".png")))
    print(f"total {record['wall_seconds']:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows of every part (A-LoL also at rows // 4)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="of the forward and of every reference pass")
    parser.add_argument("--value-num-prompts", type=int, default=1024, help="ALoLConfig.value_num_prompts")
    parser.add_argument("--generation-prompts", type=int, default=256, help="prompts of the greedy generations")
    parser.add_argument("--max-completion-length", type=int, default=32, help="new tokens of the greedy generations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 rows, vocab 4000, hidden 64, 2 layers, 8 prompts")
    parser.add_argument("--output", help="JSON to write (default: results/precompute_cost.json; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.vocab, args.hidden, args.layers, args.value_num_prompts = 300, 4000, 64, 2, 64
        args.generation_prompts, args.max_completion_length = 8, 8
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / "precompute_cost.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    run(args)


if __name__ == "__main__":
    main()
