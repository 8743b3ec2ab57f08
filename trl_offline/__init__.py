"""Offline RL and inverse RL trainers for Hugging Face TRL."""

__version__ = "0.1.0.dev0"

from .alol import ALoLConfig, ALoLTrainer
from .dro import DROConfig, DROTrainer
from .iqlearn import IQLearnConfig, IQLearnTrainer
from .losses import alol_loss, dro_loss, iqlearn_loss


__all__ = [
    "ALoLConfig",
    "ALoLTrainer",
    "DROConfig",
    "DROTrainer",
    "IQLearnConfig",
    "IQLearnTrainer",
    "alol_loss",
    "dro_loss",
    "iqlearn_loss",
]
