"""`saber-make-pairs` run from a checkout; the program is saber_jax/cli/make_pairs.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout

from saber_jax.cli import make_pairs  # noqa: E402

if __name__ == '__main__':
  make_pairs.main()
