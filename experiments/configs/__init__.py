"""ml_collections configs for the studies in `experiments/`; each exposes `get_config(arg)`."""
