"""Pure loss functions: tensors in, tensors out. No Trainer, accelerate or config objects here."""

from .alol import alol_loss
from .dro import dro_loss
from .iqlearn import iqlearn_loss, next_action_values


__all__ = ["alol_loss", "dro_loss", "iqlearn_loss", "next_action_values"]
