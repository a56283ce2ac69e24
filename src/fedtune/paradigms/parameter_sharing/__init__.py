"""Parameter sharing (FedLLM): clients send adapter updates, the server aggregates them."""
