"""The one base class for errors a user can fix; the CLI prints them without a traceback."""

from __future__ import annotations

import signal


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes deleting a job's pod, ``ray job stop``), raised in the main thread as
    Ctrl-C raises :class:`KeyboardInterrupt`, so a run stops the same way: its lease released,
    its attempt left for the rerun. Python's default ended the process on the spot: the lease
    stayed and refused the rerun for its whole five minutes."""


def stopped_by(signum: int) -> KeyboardInterrupt:
    """What a stop raises in the main thread: :class:`Terminated` for SIGTERM, as Ctrl-C (SIGINT)
    raises :class:`KeyboardInterrupt`; the CLI says which and exits 143 or 130."""
    if signum == signal.SIGTERM:
        return Terminated(f"stopped by {signal.Signals(signum).name}")
    return KeyboardInterrupt()


def raise_terminated(signum: int, frame) -> None:
    """The SIGTERM handler the CLI installs (:func:`signal.signal`)."""
    raise stopped_by(signum)
