"""The short markdown summary of a `run.py` record: the machine, each part's status, the issue's targets and each
trainer's figures."""

LABELS = {
    "sft": "SFTTrainer",
    "iqlearn": "IQLearnTrainer",
    "alol": "ALoLTrainer",
    "kto": "KTOTrainer",
    "dro": "DROTrainer (separate)",
    "dro_policy_head": "DROTrainer (policy_head)",
    "kto_lora": "KTOTrainer (LoRA)",
    "dro_adapter": "DROTrainer (adapter, LoRA)",
}


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(met) -> str:
    return "-" if met is None else ("met" if met else "**missed**")


def markdown(record: dict) -> str:
    machine = record.get("machine") or {}
    libraries = machine.get("libraries", {})
    versions = ", ".join(f"{name} {lib.get('version')}" for name, lib in libraries.items() if "version" in lib)
    gpu = machine.get("gpu") or {}
    device = f"{gpu['name']} ({gpu['memory_gib']:.0f} GiB)" if gpu else f"CPU, {machine.get('cpu_count')} cores"
    lines = [
        "# trl_offline on one device: tests and cost",
        "",
        f"`{record['command']}`",
        "",
        f"- device: {device}; python {machine.get('python')}; torch CUDA {machine.get('torch_cuda')}",
        f"- driver: {gpu.get('nvidia_smi', {}).get('driver', '-')}",
        f"- libraries: {versions}",
        f"- total {record['seconds']:.0f} s",
        "",
        "| part | status | seconds | detail |",
        "| --- | --- | --- | --- |",
    ]
    for name, part in record["parts"].items():
        lines.append(f"| {name} | {part['status']} | {_number(part.get('seconds'), '.0f')} | {_detail(part)} |")
    lines += ["", "| target | figures | ratio | at most | verdict |", "| --- | --- | --- | --- | --- |"]
    for t in record["targets"]:
        figures = (
            f"{t['trainer']} {_number(t['value'], '.4g')} / {t['baseline']} {_number(t['baseline_value'], '.4g')}"
        )
        figures += f" ({t['figure']})"
        ratio = _number(t["ratio"], ".3f")
        lines.append(f"| {t['target']} | {figures} | {ratio} | {t['at_most']:.2f} | {_verdict(t['met'])} |")
    lines += [
        "",
        "| result | trainer | median step s | tokens/s | peak MiB | peak increase MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, part in record["parts"].items():
        for trainer, f in part.get("result", {}).get("trainers", {}).items():
            lines.append(
                f"| {name} | {LABELS.get(trainer, trainer)} | {_number(f['median_s'], '.4f')} | "
                f"{_number(f['tokens_per_second'], '.0f')} | {_number(f['peak_mib'], '.0f')} | "
                f"{_number(f['peak_increase_mib'], '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def _detail(part: dict) -> str:
    if "counts" in part:
        c = part["counts"]
        return f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
    if "result" in part:
        estimate = part["result"]["memory_estimate"]["peak_gib"]
        measured = part["result"]["measured_peak_gib"]
        return f"peak {_number(measured, '.3g')} GiB measured, {estimate:.3g} GiB estimated"
    return (part.get("message") or "").replace("|", "/")[:300]
