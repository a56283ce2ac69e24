"""The bottom layer: names every other part shares, importing nothing else of fedtune.

``errors`` (what a user can act on), ``types`` (named tensors, client state, envelopes, server state),
``registry`` (one registry per plug-in kind), ``rng`` (every seeded random stream, by name).
"""
