from .config import ALoLConfig
from .trainer import ALoLTrainer


__all__ = ["ALoLConfig", "ALoLTrainer"]
