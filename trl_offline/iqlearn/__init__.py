from .config import IQLearnConfig
from .trainer import IQLearnTrainer


__all__ = ["IQLearnConfig", "IQLearnTrainer"]
