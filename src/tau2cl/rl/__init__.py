"""GRPO: the maths (pure), the rewards trained on, the update (micro-batches, log-probs) and the training model (DDP/FSDP)."""
