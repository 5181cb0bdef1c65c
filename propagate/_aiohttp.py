"""aiohttp's resolver interface over a `propagate.dns.Resolver`: ``dns.AiohttpResolver``.

Imported when ``propagate.dns.AiohttpResolver`` is first read, so that ``propagate.dns``
itself never imports aiohttp. The answers are converted as aiohttp's ``ThreadedResolver``
converts them; ``ThreadedResolver`` itself cannot be reused, since it resolves through a
private ``_loop`` whose constructor changed across aiohttp releases, so
``tests/test_dns.py`` pins the two to the same answers on the installed aiohttp.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING

try:
    from aiohttp.abc import AbstractResolver
except ImportError as exc:
    raise ImportError("propagate.dns.AiohttpResolver needs aiohttp: "
                      "pip install 'propagate[aiohttp]'") from exc
if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult
else:
    try:
        from aiohttp.abc import ResolveResult
    except ImportError:  # older aiohttp has none (a TypedDict now): a dict
        ResolveResult = dict

from .dns import AddrInfo, Resolver, _default_resolver

__all__ = ["AiohttpResolver"]

# What ThreadedResolver asks for and returns.
_NUMERIC_SOCKET_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_NAME_SOCKET_FLAGS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_AI_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", ~0)


class AiohttpResolver(AbstractResolver):
    """Like aiohttp's ``ThreadedResolver``, but each lookup goes through a `Resolver`.

    ``aiohttp.TCPConnector(resolver=propagate.dns.AiohttpResolver())`` puts each
    ``dns.lookup`` span under the span current where the request was made. The answers,
    their order and the errors are ``ThreadedResolver``'s: a failed lookup raises the
    ``socket.gaierror`` (an ``OSError``, which aiohttp reports as a connection error), and
    a timeout `LookupTimeout`, also an ``OSError``.

    ``resolver`` is the `Resolver` to use, by default the module's. ``close()`` closes
    neither: whoever made a `Resolver` closes it. Needs the ``aiohttp`` extra
    (``pip install 'propagate[aiohttp]'``): without aiohttp, reading
    ``propagate.dns.AiohttpResolver`` raises an ``ImportError`` that says so.
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver: Resolver | None = resolver
        """The `Resolver` given, or None for the module's default one."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """Like ``ThreadedResolver.resolve``: the host's addresses, as aiohttp wants them."""
        resolver = self.resolver or _default_resolver()
        try:
            infos = await resolver.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                               _AI_ADDRCONFIG)
        except socket.gaierror:
            if not _is_windows_localhost(host):
                raise
            infos = await resolver.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, 0)
        return [r for r in (_result(host, info) for info in infos) if r is not None]

    async def close(self) -> None:
        """Do nothing, as ``ThreadedResolver.close``: the `Resolver` belongs to its maker."""


def _is_windows_localhost(host: str) -> bool:
    return sys.platform == "win32" and host.rstrip(".").casefold() == "localhost"


def _result(host: str, info: AddrInfo) -> ResolveResult | None:
    family, _, proto, _, address = info
    if family == socket.AF_INET6 and len(address) < 3:
        return None  # IPv6 not supported by this Python build, or not enabled on the host
    if family == socket.AF_INET6 and address[3]:
        # link-local: the scope id belongs in the host; numeric flags, so this never blocks
        resolved, service = socket.getnameinfo(address, _NAME_SOCKET_FLAGS)
        resolved_port = int(service)
    else:
        resolved, resolved_port = address[0], address[1]
    return {"hostname": host, "host": resolved, "port": resolved_port, "family": family,
            "proto": proto, "flags": _NUMERIC_SOCKET_FLAGS}
