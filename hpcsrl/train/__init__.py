"""Self-supervised pre-training: the epoch loop, LR schedule, checkpoints and collapse monitors."""
