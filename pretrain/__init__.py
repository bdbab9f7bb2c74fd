"""Training: config tree, data, optimizers, schedules, checkpoints, metrics and the loop."""
