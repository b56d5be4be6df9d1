"""Training: the loop, checkpoints and torchrun (DDP / FSDP2)."""
