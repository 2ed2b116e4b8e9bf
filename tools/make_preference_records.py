"""`saber-make-preference-records` run from a checkout; the program is
saber_jax/cli/make_preference_records.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout

from saber_jax.cli import make_preference_records  # noqa: E402

if __name__ == '__main__':
  make_preference_records.main()
