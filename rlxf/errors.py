"""Errors the CLI reports in one line (`rlxf: error: ...`, exit 2), importable without torch.

A `UserError` is a mistake in what the user gave (a config, a data file, a path, a model directory, a spec string)
and says what to do about it; any other exception is a bug and keeps its traceback. `--log-level debug` shows the
traceback of a user error too.
"""


class UserError(ValueError):
    """Bad input that the user fixes: the message names the file, field or option and what to change."""


class SpecImportError(UserError, ImportError):
    """A `callable:module:function` spec whose module cannot be imported (an ImportError, reported in one line)."""


class SpecAttributeError(UserError, AttributeError):
    """A `callable:module:function` spec whose module has no such attribute."""


class SpecTypeError(UserError, TypeError):
    """A `callable:module:function` spec that names something not callable."""


class BackendError(RuntimeError):
    """A request the backend could not serve: a 4xx other than 429/408, or retries exhausted. Stops the run;
    finished judgements stay in the cache, so re-running continues where it stopped."""
