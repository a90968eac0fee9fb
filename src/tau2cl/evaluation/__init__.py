"""Evaluating a policy on a domain's tasks: the runner and the statistics of its episodes."""
