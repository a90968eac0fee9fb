"""The agent's side: the policy (model, tokenizer, sampling), chat rendering, tool calls, episodes, the rollout engine, user simulators."""
