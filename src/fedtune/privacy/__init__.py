"""Privacy: client-level DP (clipping, noise, accounting), DP-SGD in clients, secure aggregation."""
