"""Addresses: which hosts only this machine reaches. Servers bind 127.0.0.1 by default, and
`digits app` and `digits server` ask this before they listen anywhere else."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: what only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
