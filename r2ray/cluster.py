"""Joining a Ray cluster: ``RAY_ADDRESS`` checked before ``ray.init`` is asked to reach it."""

from __future__ import annotations

import os
import socket

from r2ray.errors import R2RayError

CONNECT_TIMEOUT_S = 5.0   # to open a TCP connection to RAY_ADDRESS's head, seconds


def ray_address() -> str | None:
    """``RAY_ADDRESS`` for ``ray.init(address=...)``, checked (:func:`check_ray_address`)."""
    address = os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    return address


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
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise R2RayError(f"RAY_ADDRESS={address!r}: no Ray cluster answers there ({err}); start "
                         "the cluster or fix the address, or unset it to start a local Ray") \
            from None


def node_resources() -> list[dict[str, float]]:
    """Each live node's total resources (``CPU``, ``GPU``), for shaping the scoring pool
    (:func:`r2ray.batch.pool.pool_shape`): one node's room, not the cluster's, decides whether a
    task fits. Needs ``ray.init`` first."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
