"""Recipes that make emflow datasets: synthetic data with known truth, real data, and the
larger-than-memory demonstration. See datasets/README.md."""
