"""Joining a Ray cluster: ``RAY_ADDRESS`` checked before ``ray.init`` is asked to reach it."""

from __future__ import annotations

import os
import socket
import sys

from r2ray.errors import R2RayError

CONNECT_TIMEOUT_S = 5.0   # to open a TCP connection to RAY_ADDRESS's head, seconds


def ray_address() -> str | None:
    """``RAY_ADDRESS`` for ``ray.init(address=...)``, checked (:func:`check_ray_address`). Unset:
    ``None`` (Ray joins the cluster it recorded as this machine's latest ``ray start``), or
    ``"local"`` (a local Ray) when that record names a cluster that no longer answers: a head
    killed without ``ray stop`` leaves the record, and ``ray.init`` retried its GCS for minutes."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return "local" if _recorded_cluster_is_gone() else None
    check_ray_address(address)
    return address


def _recorded_cluster_is_gone() -> bool:
    """Whether Ray's record of the latest ``ray start`` (``ray_current_cluster`` in its temp folder)
    names a head nothing answers at; says so on stderr, as the run then starts a local Ray."""
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(None)) as record:
            recorded = record.read().strip()
    except OSError:   # no record: Ray starts a local instance itself
        return False
    host, _, port = recorded.rpartition(":")
    if not (host and port.isdigit()) or _unreachable(host, port) is None:
        return False   # an odd record is Ray's to report
    print(f"r2ray: the Ray cluster recorded at {recorded} ({get_ray_address_file(None)}) does not "
          "answer; starting a local Ray", file=sys.stderr)
    return True


def _unreachable(host: str, port: str) -> OSError | None:
    """Why nothing accepts a TCP connection at ``host:port`` within :data:`CONNECT_TIMEOUT_S`;
    ``None`` when something does."""
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return err
    return None


def check_ray_address(address: str | None) -> None:
    """Raise :class:`R2RayError` naming ``RAY_ADDRESS`` when nothing listens at its host:port
    (``host:6379``, ``ray://host:10001``): ``ray.init`` would otherwise retry the head's GCS for
    minutes, logging only timeouts. Unset, ``auto`` and ``local`` are Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not (host and port.isdigit()):
        raise R2RayError(f"RAY_ADDRESS={address!r}: give the Ray head as HOST:PORT (its GCS, "
                         "e.g. head:6379) or ray://HOST:PORT, or unset it to start a local Ray")
    err = _unreachable(host, port)
    if err is not None:
        raise R2RayError(f"RAY_ADDRESS={address!r}: no Ray cluster answers there ({err}); start "
                         "the cluster or fix the address, or unset it to start a local Ray")


def node_resources() -> list[dict[str, float]]:
    """Each live node's total resources (``CPU``, ``GPU``), for shaping the scoring pool
    (:func:`r2ray.batch.pool.pool_shape`): one node's room, not the cluster's, decides whether a
    task fits. Needs ``ray.init`` first."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
