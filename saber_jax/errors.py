"""The error a user can fix: bad input, a refused rerun, a run that cannot start.

`python -m saber_jax.main` prints such an error as one `error: ...` line and exits 1
(the traceback only with `--debug`); any other exception is a bug and keeps its traceback.
A subclass of ValueError, so callers that catch ValueError still catch it.
"""


class UserError(ValueError):
  """Bad input or settings, named in the message; no traceback needed."""
