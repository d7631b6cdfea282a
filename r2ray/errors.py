"""The one base class for errors a user can fix; the CLI prints them without a traceback."""


class R2RayError(Exception):
    """Bad input or configuration; the message says what and where."""
