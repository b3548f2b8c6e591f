"""The peers' own test suites run against emflow (see runner.py)."""
