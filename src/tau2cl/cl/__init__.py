"""Continual learning: the strategies' context, the strategies and the transfer measures (pure)."""
