"""The base of every error caused by input (a config, a dataset, a router directory, a request).

The CLI reports these as one clean message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message names the field and the fix."""
