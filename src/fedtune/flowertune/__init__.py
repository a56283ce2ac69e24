"""FlowerTune LLM challenges run by fedtune: a challenge's ``pyproject.toml`` read and run as it says
(docs/flowertune.md)."""
