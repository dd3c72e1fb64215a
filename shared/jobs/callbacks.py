"""Callbacks: when a job that asked for one ends, its public view is POSTed to its URL.

Delivery is a task of its own (``ops.callback``), retried with backoff on network errors
and 5xx answers, so a slow or absent receiver never holds up a worker. Each request is
signed: ``X-Inferq-Signature: sha256=<HMAC of the body with INFERQ_CALLBACK_SECRET>``.
Only globally routable addresses are called unless ``INFERQ_CALLBACK_ALLOW_PRIVATE`` is
set (no loopback, private, link-local, shared 100.64/10 or other reserved ranges), so
tenants cannot aim the workers at the internal network; and the request goes to the very
address that was checked (``pinned``), so a name that resolves to a public address for
the check and to an internal one a moment later (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

__all__ = ["check_url", "pinned", "signature", "CallbackRefusedError"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackRefusedError(ValueError):
    """The URL is not one inferq will call."""


def check_url(url: str, *, allow_private: bool, resolve: bool = True) -> list[str]:
    """The addresses ``url``'s host resolves to, every one of them allowed; raises
    ``CallbackRefusedError`` for anything but an http(s) URL to a public host. With
    ``resolve`` false (the request path: no DNS lookup), only the URL's own text is checked
    and nothing is returned."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefusedError("callback_url must be an http:// or https:// URL with a host")
    host = parts.hostname
    if not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise CallbackRefusedError(_internal(host, "loopback"))
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if not allow_private and _is_internal(literal):
            raise CallbackRefusedError(_internal(host, str(literal)))
        return [str(literal)]
    if not resolve:
        return []
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise CallbackRefusedError(f"callback host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            if _is_internal(ipaddress.ip_address(address)):
                raise CallbackRefusedError(_internal(host, address))
    return addresses


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL with ``address`` in place of the host, headers, httpx extensions): the request
    goes to ``address`` while Host and, for https, the TLS server name stay the URL's own,
    so the certificate is still checked against the name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc_host = f"[{address}]" if ":" in address else address
    netloc = netloc_host if parts.port is None else f"{netloc_host}:{parts.port}"
    target = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return target, {"host": host_header}, extensions


def _is_internal(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _internal(host: str, what: str) -> str:
    return (
        f"callback host {host!r} is an internal or reserved address ({what}); "
        "set INFERQ_CALLBACK_ALLOW_PRIVATE=true to allow it"
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
