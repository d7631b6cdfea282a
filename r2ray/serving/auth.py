"""Bearer API keys: 401 when none is sent, 403 when the one sent is not accepted.

Accepted keys are read from environment variables (each may hold several, comma-separated) and
kept only as SHA-256 digests, so the application's arguments, its logs and a replica's memory
dump never hold a key in clear. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from r2ray.errors import R2RayError


class AuthError(R2RayError):
    """Missing (401) or wrong (403) credentials. The message never repeats the key sent."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_digests(env_names: list[str]) -> frozenset[str]:
    """Digests of the keys in the named environment variables; a named but unset or empty
    variable is an error (auth must never be silently off when it was asked for)."""
    digests = set()
    for name in env_names:
        keys = [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
        if not keys:
            raise R2RayError(f"api_key_envs names {name}, but that environment variable is unset "
                             "or empty; set it to one or more comma-separated keys")
        digests.update(key_digest(k) for k in keys)
    return frozenset(digests)


def check_bearer(authorization: str | None, digests: frozenset[str]) -> None:
    """Accept the request, or raise :class:`AuthError`. No digests configured: auth is off."""
    if not digests:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
    presented = key_digest(key.strip())
    if not any(hmac.compare_digest(presented, d) for d in digests):
        raise AuthError(403, "the API key sent is not accepted")
