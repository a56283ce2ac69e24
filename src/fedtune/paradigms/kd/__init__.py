"""KD-FedLLM: clients share top-k token distributions on a public set instead of weights."""
