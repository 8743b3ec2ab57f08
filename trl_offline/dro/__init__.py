from .config import DROConfig
from .trainer import DROTrainer


__all__ = ["DROConfig", "DROTrainer"]
