"""Engine replicas: discovery (static list or DNS), health, load, and the least-loaded choice.

A background task polls every replica's ``/health``, ``/v1/models`` and ``/metrics``
(``vllm:num_requests_running`` / ``vllm:num_requests_waiting``). A replica is marked down at once
when a connection to it fails and comes back when its health check passes again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from specserve.gateway.engine_model import EngineModel, parse_engine_model
from specserve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"


@dataclass
class Replica:
    """One engine's mutable state, owned by the :class:`ReplicaPool`."""

    url: str
    label: str = ""
    """The name public endpoints show: the address, or an index unless addresses are exposed."""
    healthy: bool = False
    in_flight: int = 0
    engine_running: float = 0.0
    engine_waiting: float = 0.0
    models: tuple[str, ...] = ()
    context: dict[str, int] = field(default_factory=dict)
    """Each model's ``max_model_len``, as the engine's ``/v1/models`` reports it."""
    failures: int = 0
    probe_failures: int = 0
    engine_model: EngineModel | None = None
    """The cost model the engine exports (per-step ``goodput`` policy), from the last scrape."""

    @property
    def load(self) -> float:
        return replica_load(self.in_flight, self.engine_running, self.engine_waiting)


def replica_load(in_flight: int, engine_running: float, engine_waiting: float) -> float:
    """The load estimate used for routing.

    The gateway's own in-flight count is exact and current; the engine gauges are scraped (late)
    but also see traffic that bypasses this gateway. Taking the larger of the two uses both.
    Waiting requests weigh double: they have not even started.

    Example:
        >>> replica_load(3, 2.0, 0.0)
        3.0
        >>> replica_load(1, 4.0, 1.0)
        6.0
    """
    return float(max(in_flight, engine_running + 2.0 * engine_waiting))


def pick_least_loaded(loads: Sequence[float | None], start: int = 0) -> int | None:
    """Index of the smallest load, ``None`` entries skipped; ties go to the first from ``start``.

    Rotating ``start`` spreads ties round-robin.

    Example:
        >>> pick_least_loaded([2.0, 1.0, 1.0])
        1
        >>> pick_least_loaded([2.0, 1.0, 1.0], start=2)
        2
        >>> pick_least_loaded([None, None]) is None
        True
    """
    n = len(loads)
    best: int | None = None
    for k in range(n):
        i = (start + k) % n
        value = loads[i]
        if value is None:
            continue
        best_value = loads[best] if best is not None else None
        if best_value is None or value < best_value:
            best = i
    return best


def parse_engine_load(text: str) -> tuple[float, float]:
    """Sum vLLM's running / waiting request gauges over all engines in a ``/metrics`` page.

    Example:
        >>> page = 'vllm:num_requests_running{engine="0"} 2.0\\nvllm:num_requests_waiting{engine="0"} 1.0\\n'
        >>> parse_engine_load(page)
        (2.0, 1.0)
    """
    return _engine_load(text_string_to_metric_families(text))


def parse_engine_page(text: str) -> tuple[float, float, EngineModel | None]:
    """Running and waiting requests (:func:`parse_engine_load`) and the exported cost model."""
    families = list(text_string_to_metric_families(text))
    running, waiting = _engine_load(families)
    return running, waiting, parse_engine_model(families)


def _engine_load(families: Iterable[Any]) -> tuple[float, float]:
    running = waiting = 0.0
    for family in families:
        if family.name not in (_RUNNING, _WAITING):
            continue
        total = sum(s.value for s in family.samples if s.name == family.name)
        if family.name == _RUNNING:
            running = total
        else:
            waiting = total
    return running, waiting


class ReplicaPool:
    """The set of replicas and the background task that keeps their state current."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        client: httpx.AsyncClient,
        metrics: GatewayMetrics,
        dns: str | None = None,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
        probe_timeout_s: float = 5.0,
        down_after: int = 3,
        expose_addresses: bool = False,
    ) -> None:
        self.client = client
        self.expose_addresses = expose_addresses
        self._next_index = 0
        self.metrics = metrics
        self.dns = dns
        self.interval_s = interval_s
        # A busy engine may answer probes slowly: a slow probe is not a dead engine.
        self.timeout = httpx.Timeout(max(probe_timeout_s, timeout_s), connect=timeout_s)
        self.down_after = down_after
        self.replicas: dict[str, Replica] = {}
        self._rr = 0
        self._task: asyncio.Task[None] | None = None
        for url in urls:
            self._add(url.rstrip("/"))

    # -- membership -------------------------------------------------------------------------
    def _add(self, url: str) -> None:
        if url not in self.replicas:
            label = url if self.expose_addresses else str(self._next_index)
            self._next_index += 1
            self.replicas[url] = Replica(url, label=label)
            self.metrics.replica_up.labels(replica=label).set(0)
            self.metrics.in_flight.labels(replica=label).set(0)
            log.info("replica added", extra={"fields": {"replica": url, "label": label}})

    def _remove(self, url: str) -> None:
        replica = self.replicas.pop(url, None)
        if replica is not None:
            self.metrics.replica_up.remove(replica.label)
            self.metrics.in_flight.remove(replica.label)
            log.info("replica removed", extra={"fields": {"replica": url, "label": replica.label}})

    async def resolve_dns(self) -> None:
        """Make the replica set equal to the addresses ``HOST:PORT`` resolves to now."""
        if not self.dns:
            return
        host, _, port = self.dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )
        except (OSError, ValueError) as exc:
            log.warning("replica DNS lookup failed", extra={"fields": {"dns": self.dns, "error": str(exc)}})
            return
        wanted = set()
        for family, _, _, _, sockaddr in infos:
            addr = str(sockaddr[0])
            wanted.add(f"http://[{addr}]:{port}" if family == socket.AF_INET6 else f"http://{addr}:{port}")
        if not wanted:
            return
        for url in wanted - set(self.replicas):
            self._add(url)
        for url in set(self.replicas) - wanted:
            if self.replicas[url].in_flight == 0:
                self._remove(url)

    # -- state --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.replicas.values())

    def models(self) -> set[str]:
        return {m for r in self.replicas.values() if r.healthy for m in r.models}

    def max_model_len(self, model: str) -> int | None:
        """The largest context any healthy replica serving ``model`` reported (``None``: unknown).

        Example:
            >>> from unittest.mock import MagicMock
            >>> pool = ReplicaPool([], client=MagicMock(), metrics=MagicMock())
            >>> pool.replicas["a"] = Replica("a", healthy=True, models=("m",), context={"m": 512})
            >>> pool.max_model_len("m"), pool.max_model_len("x")
            (512, None)
        """
        found = [r.context[model] for r in self.replicas.values() if r.healthy and model in r.context]
        return max(found) if found else None

    def pick(
        self, exclude: set[str] | frozenset[str] = frozenset(), model: str | None = None, *, rotate: bool = True,
        prefer: str | None = None,
    ) -> Replica | None:
        """The healthy, least-loaded replica not in ``exclude`` (and serving ``model`` if known);
        ``prefer`` (a replica's URL, chosen by goodput routing) when it is one of those.

        Each pick moves the round-robin start for ties on; ``rotate=False`` (a side call such as
        counting tokens) leaves it for the pick that routes the request.
        """
        replicas = list(self.replicas.values())
        loads: list[float | None] = [
            r.load
            if r.healthy and r.url not in exclude and (model is None or not r.models or model in r.models)
            else None
            for r in replicas
        ]
        if rotate:
            self._rr = (self._rr + 1) % max(1, len(replicas))
        for i, r in enumerate(replicas):
            if r.url == prefer and loads[i] is not None:
                return r
        index = pick_least_loaded(loads, self._rr)
        return None if index is None else replicas[index]

    def acquire(self, replica: Replica) -> None:
        replica.in_flight += 1
        self.metrics.in_flight.labels(replica.label).set(replica.in_flight)

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if replica.url in self.replicas:
            self.metrics.in_flight.labels(replica.label).set(replica.in_flight)

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("replica down", extra={"fields": {"replica": replica.url, "reason": reason}})
        replica.healthy = False
        replica.failures += 1
        if replica.url in self.replicas:
            self.metrics.replica_up.labels(replica=replica.label).set(0)

    def _mark_up(self, replica: Replica) -> None:
        if not replica.healthy:
            log.info("replica up", extra={"fields": {"replica": replica.url, "models": list(replica.models)}})
        replica.healthy = True
        replica.failures = 0
        self.metrics.replica_up.labels(replica=replica.label).set(1)

    # -- background checks --------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        """One health probe + load scrape of ``replica``; updates its state."""
        try:
            resp = await self.client.get(f"{replica.url}/health", timeout=self.timeout)
            if resp.status_code != 200:
                self.mark_down(replica, f"health status {resp.status_code}")
                return
            if not replica.models or not replica.healthy:
                listing = await self.client.get(f"{replica.url}/v1/models", timeout=self.timeout)
                listing.raise_for_status()
                cards = listing.json().get("data", [])
                replica.models = tuple(str(m["id"]) for m in cards)
                replica.context = {str(m["id"]): m["max_model_len"] for m in cards
                                   if isinstance(m.get("max_model_len"), int)}
            page = await self.client.get(f"{replica.url}/metrics", timeout=self.timeout)
            if page.status_code == 200:
                replica.engine_running, replica.engine_waiting, replica.engine_model = parse_engine_page(page.text)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.mark_down(replica, f"{type(exc).__name__}: {exc}")
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            replica.probe_failures += 1
            if replica.probe_failures >= self.down_after or not replica.models:
                self.mark_down(replica, f"{type(exc).__name__}: {exc}")
            return
        replica.probe_failures = 0
        self._mark_up(replica)

    async def check_all(self) -> None:
        await self.resolve_dns()
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad probe
                log.exception("replica check failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="replica-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


__all__ = ["Replica", "ReplicaPool", "parse_engine_load", "pick_least_loaded", "replica_load"]
