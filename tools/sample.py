"""`saber-sample` run from a checkout; the program is saber_jax/cli/sample.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout

from saber_jax.cli import sample  # noqa: E402

if __name__ == '__main__':
  sample.main()
