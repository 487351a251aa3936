"""Experiment and benchmark scripts (run as `python scripts/NAME.py` after `pip install -e .`, or
`python -m scripts.NAME` from the repository root)."""
