"""The training scripts behind `recipes/*.py` and the `trl-offline` command, shaped like TRL's `trl/scripts/`: each
module has `make_parser()` and `main(...)`, and runs as a script under `accelerate launch`."""
