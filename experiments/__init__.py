"""Thin absl entry points, one per study: `python -m experiments.<study> --config=experiments/configs/<study>.py`."""
