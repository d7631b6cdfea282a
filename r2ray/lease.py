"""A lease on a batch run folder: one run of a run id at a time.

Two runs of one run id at once undo each other: the second clears the first's attempt as an
interrupted one's, and the first's cleanup removes the second's marker. So the run that starts
first creates ``<output>/<run_id>/_r2ray_lock.json`` exclusively
(:func:`r2ray.storage.create_exclusive`), naming its owner, host, pid and expiry, and a second run
is refused at once. The holder renews it every ``RENEW_EVERY_S`` while it runs, checks it is still
its own just before its report and its commit, and removes it at the end, success or failure. The
lease of a run that died expires ``LEASE_S`` after its last renewal; the next run takes it over
and redoes the run.

Taking an expired lease over removes it and creates a fresh one. Every change to the lock after
its creation (a takeover's removal, a renewal, a release) first creates a claim named after the
lock content it read (``<lock>.takeover-<digest>``, exclusively, as the lock itself), re-reads
the lock and changes it only if it is still that content, then removes the claim. So of two runs
that read one dead lock only one removes it, and neither removes (nor a stalled holder's renewal
overwrites) the fresh lock another run has just taken it over with: at most one run holds the
lease. This needs nothing but the exclusive create, locally (a hard link) and on S3
(``If-None-Match: *``); S3's ``If-Match`` is not needed.

A claim, like the lock, names its expiry (``LEASE_S`` after it was made; it is held for
milliseconds): one left by a run that died holding it is passed once it has expired, with a
warning: the next run creates the claim named after the dead one's content instead
(``<claim>.takeover-<digest>``, exclusively again), changes the lock, and removes both. So a
crash in that window costs the next run ``LEASE_S`` of waiting, not a hand-removed file, and of
two runs passing one dead claim at once only one goes on (removing it and creating it afresh let
each remove the other's fresh claim as the dead one, and both went on).

Limits: expiry compares the wall clocks of the hosts sharing the output, which must agree well
within ``LEASE_S``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable

from r2ray import storage
from r2ray.manifest import RunFolderError, RunPaths, remove_if_empty, writing_to
from r2ray.redaction import redact_text

LEASE_S = 300.0        # a lease not renewed for this long (seconds) is a dead run's
RENEW_EVERY_S = 60.0   # how often the holder pushes its expiry LEASE_S ahead
_CLAIM = ".takeover-"  # <lock>.takeover-<digest of the content read>: held for milliseconds
_CLAIM_TRIES = 4       # claims created or passed before a change gives up (a claim a run left
                       # dying is passed by the next, named after it: one level per such death)


class RunLocked(RunFolderError):
    """Another run of this run id holds a live lease on its folder."""


class LeaseLost(RunFolderError):
    """This run's lease expired unrenewed and another run took it over: it must not commit."""


class RunLease:
    """This process's lease on one run folder, from :func:`acquire_lease` to :meth:`release`."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self.owner = secrets.token_hex(8)
        self._released = threading.Event()
        self._renewing = threading.Lock()
        self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                         name=f"r2ray-lease-{paths.run_id}")

    def start_renewing(self) -> None:
        self._renewer.start()

    def record(self) -> dict:
        """The lock's content, expiring ``LEASE_S`` from now (UTC, ISO 8601)."""
        now = dt.datetime.now(dt.timezone.utc)
        return {"run_id": self.paths.run_id, "owner": self.owner, "host": socket.gethostname(),
                "pid": os.getpid(), "renewed_at": now.isoformat(timespec="seconds"),
                "expires_at": _expiry(now)}

    def holds(self) -> bool:
        """The lock still names this lease (another run replaces it only once it has expired)."""
        return self._own_lock() is not None

    def _own_lock(self) -> dict | None:
        """The lock's content if it names this lease, else None."""
        held = read_lease(self.paths)
        return held if held is not None and held["owner"] == self.owner else None

    def renew(self) -> None:
        """Push the expiry ``LEASE_S`` ahead; :class:`LeaseLost` where another run took it over
        (or is taking it over). The rewrite is made under the lock's claim
        (:func:`_change_if_still`), so a late renewal never overwrites the lease another run has
        just taken it over with."""
        with self._renewing:   # the renewer thread and the check before the commit
            held = self._own_lock()
            if held is None or not _change_if_still(
                    self.paths, held, lambda: storage.write_bytes(self.paths.lock,
                                                                  _json(self.record()))):
                raise LeaseLost(f"run {self.paths.run_id} lost its lease {self.paths.lock}: it "
                                f"went unrenewed for {LEASE_S:g} s and another run took it over; "
                                "nothing was committed by this run")

    def release(self) -> None:
        """Stop renewing; remove the lock if it is still this lease's, and the run folder if that
        leaves it empty (a fresh run that failed before writing anything). A lock that cannot be
        removed is only warned about: it expires by itself."""
        self._released.set()
        if self._renewer.is_alive():
            self._renewer.join()
        try:
            held = self._own_lock()
            if held is not None and _change_if_still(
                    self.paths, held, lambda: storage.remove(self.paths.lock, recursive=False)):
                remove_if_empty(self.paths.root)
        except Exception as err:  # noqa: BLE001 — the run's own outcome must not be lost to this
            _warn(f"could not release the lease {self.paths.lock} ({type(err).__name__}: {err}); "
                  f"it expires within {LEASE_S:g} s")

    def _renew_until_released(self) -> None:
        while not self._released.wait(RENEW_EVERY_S):
            try:
                self.renew()
            except LeaseLost:
                return   # the check before the commit refuses it
            except Exception as err:  # noqa: BLE001 — a storage blip: the next renewal retries
                _warn(f"could not renew the lease {self.paths.lock} ({type(err).__name__}: "
                      f"{err}); trying again in {RENEW_EVERY_S:g} s")


def acquire_lease(paths: RunPaths) -> RunLease:
    """Take the run folder's lease (and start renewing it), or raise :class:`RunLocked` naming
    the run that holds it. An expired lease (its run died) is taken over."""
    lease = RunLease(paths)
    for _ in range(3):   # an expired lease is removed and created afresh: another run may win
        with writing_to(paths):
            created = storage.create_exclusive(paths.lock, _json(lease.record()))
        if created:
            lease.start_renewing()
            return lease
        held = read_lease(paths)
        if held is not None and not _expired(held):
            raise RunLocked(
                f"run {paths.run_id} is already running: owner {held['owner']} on "
                f"{held.get('host', '?')} (pid {held.get('pid', '?')}) holds its lease "
                f"{paths.lock} until {held['expires_at']}. Wait for it to finish; a run that "
                "died leaves its lease to expire by then, and the next run redoes it")
        if held is not None:
            _change_if_still(paths, held, lambda: storage.remove(paths.lock, recursive=False))
    raise RunLocked(f"run {paths.run_id}: its lease {paths.lock} changed hands while this run "
                    "tried to take it; another run of it has just started (or is taking it over: "
                    f"if none is, the claim {paths.lock}{_CLAIM}* a dead run left expires within "
                    f"{LEASE_S:g} s)")


def _change_if_still(paths: RunPaths, seen: dict, change: Callable[[], None]) -> bool:
    """Run ``change`` (remove or rewrite the lock) only if the lock is still ``seen``: True if it
    ran. Every run changing one lock content first creates the same claim exclusively, so one at
    a time re-reads and changes: without it a run that read a dead lock late removed the fresh
    lock another run had just taken it over with, and both ran (and a renewal or release could
    overwrite or remove it likewise). False, unchanged, where another run holds the claim. The
    claim (and the dead ones it passed) is removed at once after."""
    claims = _take_claim(paths, claim_path(paths, seen), seen)
    if claims is None:
        return False
    try:
        if read_lease(paths) != seen:
            return False
        change()
        return True
    finally:
        for claim in claims:
            storage.remove(claim, recursive=False)


def claim_path(paths: RunPaths, seen: dict) -> str:
    """The claim every run changing the lock content ``seen`` must create first."""
    return paths.lock + _CLAIM + _digest(_json(seen))


def _take_claim(paths: RunPaths, claim: str, seen: dict) -> list[str] | None:
    """Create ``claim`` exclusively: the claims to remove once the change is made (the one taken
    and the dead ones passed), or None where a live (or unreadable) claim stands.

    A claim a dead run left (expired) is not removed and made again: two runs that read it at
    once could each remove the other's fresh one as the dead one, and both go on. It is passed:
    the claim named after its content (``<claim>.takeover-<digest>``) is created exclusively
    instead, so of the runs that read one dead claim one goes on, with nothing but the exclusive
    create. The dead claim is removed with the taken one, after the change."""
    record = _json({"owner": seen["owner"],
                    "expires_at": _expiry(dt.datetime.now(dt.timezone.utc))})
    passed: list[str] = []
    for _ in range(_CLAIM_TRIES):
        with writing_to(paths):
            if storage.create_exclusive(claim, record):
                return [claim, *passed]
        dead = _dead_claim(claim)
        if dead is None:
            return None
        if dead:   # else it was removed meanwhile: create it again
            _warn(f"passing {claim}: a run that died holding it left it (expired "
                  f"{json.loads(dead)['expires_at']}); it is removed after this change")
            passed.append(claim)
            claim += _CLAIM + _digest(dead.encode("utf-8"))
    return None


def _dead_claim(claim: str) -> str | None:
    """The claim's content if it has expired ("" if it is gone), or None: live, or unreadable
    (left alone)."""
    try:
        text = storage.read_text(claim)
        return text if _expired(json.loads(text)) else None
    except FileNotFoundError:
        return ""
    except (AttributeError, ValueError, KeyError, TypeError):
        return None


def read_lease(paths: RunPaths) -> dict | None:
    """The lock's content (None: no lease); a lock that is not one names itself in the error."""
    try:
        text = storage.read_text(paths.lock)
    except FileNotFoundError:
        return None
    try:
        held = json.loads(text)
        if not (isinstance(held.get("owner"), str) and _expires_at(held).tzinfo is not None):
            raise ValueError("it names no owner, or its expiry no time zone")
    except (AttributeError, ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{paths.lock} is no lease r2ray can read ({type(err).__name__}: "
                             f"{err}); if no run of {paths.run_id} is running, remove it") from None
    return held


def _expiry(now: dt.datetime) -> str:
    """When a lock or a claim made ``now`` expires: ``LEASE_S`` later (UTC, ISO 8601)."""
    return (now + dt.timedelta(seconds=LEASE_S)).isoformat(timespec="seconds")


def _expires_at(held: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(held["expires_at"])


def _expired(held: dict) -> bool:
    return _expires_at(held) <= dt.datetime.now(dt.timezone.utc)


def _digest(content: bytes) -> str:
    """What names a claim: sha256 of the content it is about (hex, 16 characters)."""
    return hashlib.sha256(content).hexdigest()[:16]


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def _warn(message: str) -> None:
    print(f"warning: {redact_text(message)}", file=sys.stderr)
