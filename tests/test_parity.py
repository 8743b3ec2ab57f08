"""The parity table (tests/parity_table.py) against the installed TRL: complete, its evidence real, its docs current."""

import ast
import dataclasses
import os

import pytest
from parity_table import (
    HONOURED,
    KTO_CONFIG,
    KTO_TRAINER,
    NO_SUCH_FIELD,
    NOT_APPLICABLE,
    REFUSED,
    SFT_CONFIG,
    SFT_TRAINER,
    render,
    trl_config_fields,
    trl_constructor_arguments,
)
from transformers import TrainingArguments
from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"A-LoL": ALoLConfig, "DRO": DROConfig, "IQLearn": IQLearnConfig}
ALL_ROWS = [
    *[
        (f"{trainer} {name}", row)
        for trainer, rows in {**KTO_CONFIG, **SFT_CONFIG}.items()
        for name, row in rows.items()
    ],
    *[(f"{trainer} KTOTrainer {name}", row) for trainer, rows in KTO_TRAINER.items() for name, row in rows.items()],
    *[(f"SFTTrainer {name}", row) for name, row in SFT_TRAINER.items()],
]


@pytest.mark.parametrize(
    "trl_config,ours",
    [(KTOConfig, KTO_CONFIG["A-LoL"]), (KTOConfig, KTO_CONFIG["DRO"]), (SFTConfig, SFT_CONFIG["IQLearn"])],
)
def test_every_trl_config_field_is_classified(trl_config, ours):
    # Exactly TRL's fields: one TRL adds fails until classified, one it drops fails until removed
    assert set(ours) == set(trl_config_fields(trl_config))


@pytest.mark.parametrize(
    "trl_trainer,ours",
    [(KTOTrainer, KTO_TRAINER["A-LoL"]), (KTOTrainer, KTO_TRAINER["DRO"]), (SFTTrainer, SFT_TRAINER)],
)
def test_every_trl_constructor_argument_is_classified(trl_trainer, ours):
    assert set(ours) == set(trl_constructor_arguments(trl_trainer))


@pytest.mark.parametrize(
    "trainer,ours",
    [(ALoLTrainer, KTO_TRAINER["A-LoL"]), (DROTrainer, KTO_TRAINER["DRO"]), (IQLearnTrainer, SFT_TRAINER)],
)
def test_every_honoured_constructor_argument_is_accepted(trainer, ours):
    accepted = set(trl_constructor_arguments(trainer))
    assert {name for name, row in ours.items() if row.status == HONOURED} <= accepted


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_training_argument_is_inherited(name):
    ours = {f.name for f in dataclasses.fields(CONFIGS[name])}
    assert {f.name for f in dataclasses.fields(TrainingArguments)} <= ours


def _test_names(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("label,row", ALL_ROWS, ids=[label for label, _ in ALL_ROWS])
def test_every_row_has_its_evidence(label, row):
    assert row.status in (HONOURED, REFUSED, NOT_APPLICABLE) and row.how
    if row.status == NOT_APPLICABLE or row.evidence == NO_SUCH_FIELD:
        return
    path, _, test = row.evidence.partition("::")
    assert os.path.isfile(os.path.join(ROOT, path)), f"{label}: no file {path}"
    assert test in _test_names(path), f"{label}: no test {row.evidence}"


def _refused_by_absence():
    for trainer, rows in {**KTO_CONFIG, **SFT_CONFIG}.items():
        for name, row in rows.items():
            if row.evidence == NO_SUCH_FIELD:
                yield CONFIGS[trainer], name


@pytest.mark.parametrize("config,name", list(_refused_by_absence()))
def test_a_field_refused_by_absence_is_an_error_naming_it(tmp_path, config, name):
    assert name not in {f.name for f in dataclasses.fields(config)}
    with pytest.raises(TypeError, match=f"'{name}'"):
        config(output_dir=str(tmp_path), **{name: 1})


def test_docs_table_is_current():
    with open(os.path.join(ROOT, "docs", "parity.md")) as f:
        assert f.read() == render(), "regenerate it: python tests/parity_table.py > docs/parity.md"
