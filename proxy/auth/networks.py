"""Network allow-lists (like security groups): which client addresses may connect to an endpoint."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowList:
    """The networks of one endpoint's `allowed_cidrs`, parsed once; `admits` runs once per accepted connection."""

    __slots__ = ("networks", "text")

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(cidr) for cidr in cidrs)
        self.text = ", ".join(cidrs) or "(none)"

    def admits(self, host: str) -> bool:
        """Whether a peer address (as the socket gives it; an IPv4-mapped IPv6 address counts as its IPv4 one) is in
        one of the networks; a peer that is not an IP address (a unix socket) is admitted."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"AllowList({self.text})"


@lru_cache(maxsize=256)
def _allow_list(cidrs: tuple[str, ...]) -> AllowList:
    return AllowList(cidrs)


def allow_list(cidrs: list[str] | None) -> AllowList | None:
    """The allow-list of an endpoint's resolved `allowed_cidrs` (None: every address may connect); endpoints with
    the same list share one."""
    return None if cidrs is None else _allow_list(tuple(cidrs))
