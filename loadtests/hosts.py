"""The loopback rule: load goes only to this machine unless a host is named explicitly.

Contract: :func:`check_target` accepts a base URL whose host is a loopback address (127.0.0.0/8, ::1)
or a name that resolves only to loopback addresses (``localhost``), and raises :class:`TargetRefused`
otherwise. The one way around it is to name the exact host in ``allow`` (the locustfile reads
``SPARSE_SERVE_LOADTEST_ALLOW_HOSTS``, comma-separated): the compose stack uses that to let its locust
container reach the ``sparse`` and ``dense`` services. The driver (:mod:`loadtests.run`) never allows
anything but loopback.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

ALLOW_ENV = "SPARSE_SERVE_LOADTEST_ALLOW_HOSTS"


class TargetRefused(ValueError):
    """The load-test target is not a loopback address and was not explicitly allowed."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) means only this machine."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_target(url: str, allow: Iterable[str] = ()) -> str:
    """``url`` if its host is loopback or listed in ``allow``; :class:`TargetRefused` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"load-test target {url!r} is not an http(s) URL with a host")
    allowed = {h.strip().lower() for h in allow if h.strip()}
    if parts.hostname.lower() in allowed or is_loopback(parts.hostname):
        return url
    raise TargetRefused(f"refusing to send load to {parts.hostname!r}: load tests only target loopback addresses "
                        f"(127.0.0.1, ::1, localhost); name the host in {ALLOW_ENV} to allow it explicitly")


def parse_allow(value: str | None) -> list[str]:
    """The comma-separated allow-list of :data:`ALLOW_ENV`."""
    return [h.strip() for h in (value or "").split(",") if h.strip()]
