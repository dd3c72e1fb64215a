"""Callbacks: when a job that asked for one ends, its public view is POSTed to its URL.

Delivery is a task of its own (``ops.callback``), retried with backoff on network errors
and 5xx answers, so a slow or absent receiver never holds up a worker. Each request is
signed: ``X-Inferq-Signature: sha256=<HMAC of the body with INFERQ_CALLBACK_SECRET>``.
URLs resolving to loopback, private or link-local addresses are refused unless
``INFERQ_CALLBACK_ALLOW_PRIVATE`` is set, so tenants cannot aim the workers at the
internal network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["check_url", "signature", "CallbackRefusedError"]


class CallbackRefusedError(ValueError):
    """The URL is not one inferq will call."""


def check_url(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Raise ``CallbackRefusedError`` for anything but an http(s) URL to a public host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefusedError("callback_url must be an http:// or https:// URL with a host")
    if allow_private:
        return
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost"):
        raise CallbackRefusedError(_internal(host, "loopback"))
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None and _is_internal(literal):
        raise CallbackRefusedError(_internal(host, str(literal)))
    if not resolve or literal is not None:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise CallbackRefusedError(f"callback host {parts.hostname!r} does not resolve") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if _is_internal(address):
            raise CallbackRefusedError(_internal(host, str(address)))


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_private or address.is_loopback or address.is_link_local


def _internal(host: str, what: str) -> str:
    return (
        f"callback host {host!r} is an internal address ({what}); "
        "set INFERQ_CALLBACK_ALLOW_PRIVATE=true to allow it"
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
