"""The one base class for errors a user can fix; the CLI prints them without a traceback."""

from __future__ import annotations


class R2RayError(Exception):
    """Bad input or configuration; the message says what and where."""


class ConfigError(R2RayError, ValueError):
    """A config (batch job or Serve app) that does not validate; every problem on its own line."""

    @classmethod
    def from_validation(cls, what: str, err) -> ConfigError:
        """One readable error from a pydantic ``ValidationError``: ``field: message`` per line."""
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'config'}: "
                 f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors()]
        return cls(f"invalid {what}:\n" + "\n".join(lines))
