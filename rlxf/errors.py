"""Errors the CLI turns into a one-line message, importable without torch."""


class BackendError(RuntimeError):
    """A request the backend could not serve: a 4xx other than 429/408, or retries exhausted. Stops the run;
    finished judgements stay in the cache, so re-running continues where it stopped."""
