"""The LLM worker: takes turn requests while it has capacity, streams the model, publishes frames."""
