"""`saber-build-test-set` run from a checkout; the program is saber_jax/cli/build_test_set.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout

from saber_jax.cli import build_test_set  # noqa: E402

if __name__ == '__main__':
  build_test_set.main()
