"""The worked examples of docs/losses.md run as doctests against `saber_jax.losses`, so the
page's equations and numbers stay those of the code."""

import doctest
import pathlib

PAGE = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'losses.md'


def test_loss_page_examples():
  result = doctest.testfile(str(PAGE), module_relative=False, verbose=False,
                            optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.attempted >= 20, result      # the page's examples were found and run
  assert result.failed == 0, result
