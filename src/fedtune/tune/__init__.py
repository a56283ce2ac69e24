"""fedtune tune: federated hyper-parameter optimisation over a config's keys, rounds as the budget (docs/tune.md)."""
