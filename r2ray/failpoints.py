"""Named failure points for crash-safety tests, inert unless ``R2RAY_FAILPOINT`` is set.

``R2RAY_FAILPOINT=before_commit`` raises in the driver just before the manifest is written;
``R2RAY_FAILPOINT=kill_worker_once:<marker path>`` makes the first scoring worker that gets a batch
kill its own process (``os._exit``), once per marker file, as a machine loss would.
"""

from __future__ import annotations

import os

FAILPOINT_ENV = "R2RAY_FAILPOINT"


def failpoint(name: str) -> None:
    """Raise at the point called ``name`` when the environment asks for it."""
    if os.environ.get(FAILPOINT_ENV) == name:
        raise RuntimeError(f"failpoint {name!r} hit ({FAILPOINT_ENV})")


def kill_worker_once() -> None:
    """Exit this worker process abruptly the first time (per marker file) it is asked to."""
    point = os.environ.get(FAILPOINT_ENV, "")
    if not point.startswith("kill_worker_once:"):
        return
    try:
        os.close(os.open(point.split(":", 1)[1], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os._exit(1)
