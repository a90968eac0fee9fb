"""The trainer's parts, each an object of its own: rollouts and their scores, the GRPO step, the
accuracy matrix and its evaluation stages, the checkpointer, and the stop boundary. trainer.py sets
them up and runs the domain loop."""
