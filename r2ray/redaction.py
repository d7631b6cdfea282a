"""Credentials out of URIs before they are printed, logged or stored.

:func:`redact_uri` masks the password of ``scheme://user:password@host`` and the values of
credential query parameters (``?token=…``, ``X-Amz-Signature=…``); :func:`redact_text` does the
same to every URI inside a message; :func:`redact_values` to every string in params or a manifest;
:func:`quoted_error` to an error body a server sent back, with the key it was sent masked too.
:func:`redacted_output` guards calls into code that quotes URIs as given (MLflow prints run links
and raises errors with the tracking URI, password included).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit

MASK = "***"
SENSITIVE_PARAMS = ("token", "access_token", "api_key", "apikey", "key", "secret", "password",
                    "pwd", "sig", "signature", "X-Amz-Signature", "X-Amz-Credential",
                    "X-Amz-Security-Token")
# a URI ends where another begins ("…@h1,https://u:pw@h2", "?next=https://u:pw@h"): each is
# masked on its own, as one match only the first one's password was
_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://(?:(?![a-z][a-z0-9+.-]*://)[^\s'\"<>`])+",
                  re.IGNORECASE)
# a credential parameter anywhere after ? & ; or # (also in the path-only URLs urllib3 quotes)
_PARAM = re.compile(rf"([?&;#](?:{'|'.join(map(re.escape, SENSITIVE_PARAMS))})=)[^&#;\s'\"<>`]*",
                    re.IGNORECASE)


# scheme://user:password@ where the password holds a raw "/", "?" or "#" (an AWS secret key
# often has a "/", generated passwords a "#"), which ends urlsplit's netloc early; a password of
# digits up to that character is a port (host:8080/a@b, host:8080?to=a@b)
_DELIMITED_PASSWORD = re.compile(
    r"^([a-z][a-z0-9+.-]*://[^/?#@:\s]*:)(?!\d*[/?#])([^@\s]*[/?#][^@\s]*)@", re.IGNORECASE)


def _mask_password(uri: str) -> str:
    delimited = _DELIMITED_PASSWORD.sub(rf"\g<1>{MASK}@", uri, count=1)
    if delimited != uri:
        return delimited
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
    except ValueError:  # not a URI after all (bad IPv6 literal, ...)
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")  # rpartition: a raw "@" in the password
    return uri.replace(parts.netloc, f"{userinfo.split(':', 1)[0]}:{MASK}@{host}", 1)


def redact_uri(uri: str) -> str:
    """``uri`` with its password and credential query values replaced by ``***``; anything else,
    a URI without credentials included, comes back unchanged."""
    return _PARAM.sub(rf"\g<1>{MASK}", _mask_password(uri)) if isinstance(uri, str) else uri


def redact_text(text: str) -> str:
    """``text`` with every URI in it redacted as :func:`redact_uri` does."""
    return _PARAM.sub(rf"\g<1>{MASK}", _URI.sub(lambda m: _mask_password(m[0]), text))


def quoted_error(text: str, api_key: str | None, limit: int) -> str:
    """The first ``limit`` characters of an error body a server answered, safe to show or store:
    the key sent masked wherever it is echoed ("invalid API key: sk-…"), before the cut so no
    prefix of it is left, and the credentials of any URL in it."""
    if api_key:
        text = text.replace(api_key, MASK)
    return redact_text(text[:limit])


def redact_values(value):
    """A copy of ``value`` (dicts, lists and tuples, nested) with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value


class _RedactingStream:
    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact_text(text))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """While inside (or around a decorated function): redact what is written to stdout/stderr,
    every log record created and every warning shown. Process-wide, like the streams it wraps."""
    make_record, show_warning = logging.getLogRecordFactory(), warnings.showwarning

    def record(*args, **kwargs) -> logging.LogRecord:
        made = make_record(*args, **kwargs)
        try:
            made.msg, made.args = redact_text(made.getMessage()), ()
        except (TypeError, ValueError):  # a bad format string: logging reports it, as it would
            pass
        if made.exc_info:  # handlers print the traceback's text, so redact that too
            made.exc_text = redact_text(logging.Formatter().formatException(made.exc_info))
        return made

    logging.setLogRecordFactory(record)
    warnings.showwarning = lambda message, *rest, **kw: show_warning(
        redact_text(str(message)), *rest, **kw)
    try:
        with contextlib.redirect_stdout(_RedactingStream(sys.stdout)), \
                contextlib.redirect_stderr(_RedactingStream(sys.stderr)):
            yield
    finally:
        logging.setLogRecordFactory(make_record)
        warnings.showwarning = show_warning
