"""The long-lived parts of one gateway: replicas, proxy, limits, metrics (``app.state.gateway``).

Routes read it from the request; :func:`specserve.gateway.app.create_app` builds it and runs its
start and stop in the app's lifespan.
"""

from __future__ import annotations

import httpx

from specserve.gateway.config import GatewayConfig
from specserve.gateway.limits import AdmissionQueue, RateLimiter
from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.prompt_tokens import TOKENIZE_TIMEOUT_S, EngineTokenizer
from specserve.gateway.proxy import Proxy, engine_auth_headers
from specserve.gateway.replicas import ReplicaPool
from specserve.gateway.speculation import SpecLength
from specserve.structured.precheck import SchemaPrecheck


class Gateway:
    """The long-lived parts of one gateway app (``app.state.gateway``)."""

    def __init__(
        self, config: GatewayConfig, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.metrics = metrics
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=config.max_in_flight)
        self.client = httpx.AsyncClient(limits=limits, trust_env=False,  # health checks
                                        headers=engine_auth_headers(config.engine_api_key))
        self.pool = ReplicaPool(
            config.replicas, client=self.client, metrics=metrics, dns=config.replicas_dns,
            interval_s=config.health_interval_s, timeout_s=config.connect_timeout_s,
            expose_addresses=config.expose_replica_addresses,
            probe_timeout_s=config.health_timeout_s,
        )
        self.proxy = Proxy(
            self.pool, metrics, max_attempts=config.max_attempts,
            request_timeout_s=config.request_timeout_s, connect_timeout_s=config.connect_timeout_s,
            engine_api_key=config.engine_api_key,
        )
        self.tokenizer = EngineTokenizer(self.pool, lambda: self.proxy.session,
                                         timeout_s=min(config.request_timeout_s, TOKENIZE_TIMEOUT_S))
        self.spec = SpecLength(config.spec_policy, config.goodput_settings(), self.pool, metrics,
                               routing=config.routing)
        self.limiter = RateLimiter(config.key_limits)
        self.queue = AdmissionQueue(config.max_in_flight, config.max_queue, config.queue_timeout_s)
        self.schema_check = SchemaPrecheck()
        """The structured-output pre-check, with its compile cache and compile workers."""

    async def start(self) -> None:
        self.schema_check.warm_up()  # import xgrammar in the background, off the first request's path
        await self.proxy.start()
        await self.pool.check_all()
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        await self.proxy.close()
        await self.client.aclose()
        self.schema_check.close()
