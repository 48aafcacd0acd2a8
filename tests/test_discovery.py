from __future__ import annotations

import asyncio
import socket

from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import DnsEndpoints, Endpoint, StaticEndpoints
from proxy.discovery import EndpointWatcher, resolve_targets


class TableResolver(AbstractResolver):
    """A resolver answering from a table that the test edits (aiohttp's FakeResolver shape)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0
        self.looked_up = asyncio.Event()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        self.looked_up.set()
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for ip in self.table[host]
        ]

    async def close(self) -> None:
        pass


async def test_real_dns_lookup_of_localhost() -> None:
    got = await resolve_targets([Endpoint("localhost", 9001)], _threaded())
    assert "127.0.0.1:9001" in [ep.key for ep in got]


def _threaded() -> AbstractResolver:
    from aiohttp.resolver import ThreadedResolver

    return ThreadedResolver()


async def test_every_record_becomes_an_endpoint_sorted() -> None:
    resolver = TableResolver({"pods": ["127.0.0.3", "127.0.0.1", "::1", "127.0.0.2"]})
    got = await resolve_targets([Endpoint("pods", 8080, weight=2)], resolver)
    assert [ep.key for ep in got] == [
        "127.0.0.1:8080",
        "127.0.0.2:8080",
        "127.0.0.3:8080",
        "[::1]:8080",
    ]
    assert {ep.weight for ep in got} == {2}


async def test_ip_literals_are_not_looked_up() -> None:
    resolver = TableResolver({})
    got = await resolve_targets([Endpoint("10.1.2.3", 80)], resolver)
    assert [ep.key for ep in got] == ["10.1.2.3:80"] and resolver.lookups == 0


async def test_static_source_reports_once_and_stops() -> None:
    seen: list[tuple[Endpoint, ...]] = []
    watcher = EndpointWatcher(
        "c", StaticEndpoints((Endpoint("127.0.0.2", 1), Endpoint("127.0.0.1", 1))), seen.append
    )
    await asyncio.wait_for(watcher.run(), 5)
    assert [[ep.key for ep in s] for s in seen] == [["127.0.0.1:1", "127.0.0.2:1"]]


async def test_failed_lookup_keeps_last_good_set_and_change_is_reported() -> None:
    resolver = TableResolver({"pods": ["127.0.0.1", "127.0.0.2"]})
    changes: asyncio.Queue[tuple[Endpoint, ...]] = asyncio.Queue()
    watcher = EndpointWatcher(
        "c",
        DnsEndpoints((Endpoint("pods", 80),)),
        changes.put_nowait,
        resolver=resolver,
        refresh=0.01,
    )
    task = asyncio.create_task(watcher.run())
    try:
        first = await asyncio.wait_for(changes.get(), 5)
        assert len(first) == 2
        del resolver.table["pods"]  # lookups now fail: nothing must be reported
        lookups = resolver.lookups
        while resolver.lookups < lookups + 3:
            resolver.looked_up.clear()
            await asyncio.wait_for(resolver.looked_up.wait(), 5)
        assert changes.empty()
        resolver.table["pods"] = ["127.0.0.2", "127.0.0.3"]
        third = await asyncio.wait_for(changes.get(), 5)
        assert [ep.key for ep in third] == ["127.0.0.2:80", "127.0.0.3:80"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
