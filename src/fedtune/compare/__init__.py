"""fedtune compare: variants of one config over several seeds, side by side (docs/compare.md)."""
