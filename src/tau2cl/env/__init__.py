"""tau2-bench's side: domains and their splits, environments, golden conversations, tau2's reward, Results files."""
