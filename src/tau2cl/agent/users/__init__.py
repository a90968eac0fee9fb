"""User simulators: the interface (base), the scripted user, local-model and litellm users, and the choice among them (build)."""
