"""Helpers every test package shares (never imported from a test module): configs, built pieces, the wire,
hostile mutations, the CLI, a deployed federation."""
