"""`trl-offline`: the command line of the three trainers, the way `trl sft|dpo|kto` is TRL's.

    trl-offline dro --config recipes/configs/dro_tiny.yaml
    trl-offline dro --config recipes/configs/dro_gpu.yaml --accelerate_config zero3
    trl-offline alol --config my.yaml --accelerate_config path/to/accelerate.yaml --num_processes 4

Every run goes through `accelerate launch` (accelerate's own parser and launcher), with the script of
`trl_offline/scripts/`. The script's parser takes its arguments (from the command line and the `--config` file); what
it does not know goes to `accelerate launch` (`--num_processes`, `--main_process_port`, ...). `--accelerate_config`
names a file, one of ours (`ddp`, `zero2`, `zero3` for GPUs; `ddp_cpu`, `zero2_cpu`, `zero3_cpu` for 2 CPU processes),
or one of TRL's (`zero1`, `multi_gpu`, `fsdp2`, ...).
"""

import argparse
import importlib
import importlib.resources as resources
import sys
from pathlib import Path


COMMANDS = {
    "iqlearn": "IQLearn: imitation by inverse soft-Q learning, in place of `trl sft`",
    "alol": "A-LoL: offline policy gradient on scored responses",
    "dro": "DRO: Direct Reward Optimisation on single scored responses, in place of `trl kto`",
}


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME_OR_PATH` among `launch_args` -> `--config_file PATH`, looked up as a file, then among
    our configs, then among TRL's."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("Expected a value after `--accelerate_config`.")
    name = launch_args[index + 1]
    rest = launch_args[:index] + launch_args[index + 2 :]
    configs = resources.files("trl_offline").joinpath("accelerate_configs")
    ours = configs.joinpath(f"{name}.yaml")
    if ours.is_file() and not Path(name).is_file():
        return ["--config_file", str(ours)] + rest
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        return resolve_accelerate_config_argument(["--accelerate_config", name] + rest)  # a path, or TRL's names
    except ValueError as error:
        names = sorted(f.name.removesuffix(".yaml") for f in configs.iterdir() if f.name.endswith(".yaml"))
        raise ValueError(
            f"`--accelerate_config {name}` is neither a file nor a config of trl-offline ({', '.join(names)}) or of "
            "TRL (trl/accelerate_configs)."
        ) from error


def split_arguments(name: str, argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` (after the command's name) -> (`accelerate launch` arguments, the script's arguments)."""
    parser = importlib.import_module(f"trl_offline.scripts.{name}").make_parser(prog=f"trl-offline {name}")
    # `-h` prints the script's help and exits here. The leftovers of the config file and of the command line are
    # kept apart: only the command line's are removed from what the script gets
    *_, config_leftovers, cli_leftovers = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config(config_leftovers + cli_leftovers)
    return launch_args, _without_subsequence(argv, cli_leftovers)


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (its first match, in order)."""
    remaining, kept = iter(subsequence), []
    current = next(remaining, None)
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="trl-offline", description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", help="the trainer to run")
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 0
    launch_args, script_args = split_arguments(args.command, argv[1:])
    script = resources.files("trl_offline.scripts").joinpath(f"{args.command}.py")
    launch_command(launch_command_parser().parse_args(launch_args + [str(script)] + script_args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
