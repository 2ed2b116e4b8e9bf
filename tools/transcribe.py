"""`saber-transcribe` run from a checkout; the program is saber_jax/cli/transcribe.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout

from saber_jax.cli import transcribe  # noqa: E402

if __name__ == '__main__':
  transcribe.main()
