"""Run configs: `python -m saber_jax.main --config=configs/<name>.py[:arg]` (`configs/` in a
checkout links here; an installed package resolves the same names)."""
