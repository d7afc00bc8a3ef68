"""DreamBooth training: run config, data, parameter groups, the step, checkpoints, logs, the loop."""

from jaxdream.training.loop import TrainingError, train  # noqa: F401
