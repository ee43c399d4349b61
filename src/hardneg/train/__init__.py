"""Training: the trainer, crash-safe checkpoints and RNG state (see hardneg.train.trainer)."""
