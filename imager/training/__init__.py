"""Training: the streaming loader, EMA, checkpoints with full state, the loop, distributed helpers."""
