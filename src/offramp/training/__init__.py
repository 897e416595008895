"""The training loop (Accelerate) and its arguments."""

from offramp.training.loop import TrainingArgs, evaluate_exits, train

__all__ = ["TrainingArgs", "evaluate_exits", "train"]
