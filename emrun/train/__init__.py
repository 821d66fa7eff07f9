"""Training: the Trainer, checkpoints (atomic saves, exact-resume random state), optimizers,
learning-rate schedules, the weight EMA, gradient clipping, logging and distributed set-up."""
