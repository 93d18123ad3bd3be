class WeDetectError(Exception):
    """A user-facing error: bad input, missing file, wrong checkpoint kind."""
