"""Continual-learning strategies: hooks in base.py, one module per family, names in registry.py."""
