"""Helpers for tests and examples that ship with the package: tiny random checkpoints in the released layout."""
