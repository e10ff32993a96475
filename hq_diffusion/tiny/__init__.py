"""Tiny offline models (random weights, built in code) of every registered model family."""
