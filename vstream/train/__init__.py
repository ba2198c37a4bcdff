"""Training: the paper's two stages (projector, then finetune) and a vision stage for towers trained from scratch."""
