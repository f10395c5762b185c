"""Benchmarks behind ``appliance bench NAME``: each measures side by side in one run and prints ratios."""
