"""Measured experiments, runnable as scripts (`python3 verify/experiments/NAME.py --help`)."""
