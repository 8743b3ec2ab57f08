"""Pure loss functions: tensors in, tensors out. No Trainer, accelerate or config objects here."""

from .iqlearn import iqlearn_loss, next_action_values


__all__ = ["iqlearn_loss", "next_action_values"]
