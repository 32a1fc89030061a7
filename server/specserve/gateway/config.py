"""Gateway configuration: one validated value built at start-up and never mutated.

Example:
    >>> cfg = GatewayConfig(replicas=["http://127.0.0.1:8001"])
    >>> cfg.max_body_bytes
    4194304
    >>> GatewayConfig(replicas_dns="engine:8000").replicas
    []
    >>> GatewayConfig(replicas_dns="e:8000", spec_policy="goodput").goodput_settings().step_base_s
    0.02
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specserve.gateway.goodput import GoodputSettings, SpecPolicy

if TYPE_CHECKING:
    from specserve.gateway.connections import ConnectionLimits


class KeyLimits(BaseModel):
    """Per-API-key rate limits (0 = unlimited)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int = Field(default=0, ge=0)
    """Requests a key may start per rolling minute."""
    tokens_per_minute: int = Field(default=0, ge=0)
    """Tokens (prompt + requested max_tokens) a key may spend per rolling minute; the prompt is its
    exact count when ``max_prompt_tokens`` counted it, else estimated as characters / 4."""


class GatewayConfig(BaseModel):
    """Everything the gateway needs to know; see ``docs/gateway.md`` for the matching flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replicas: list[str] = Field(default_factory=list)
    """Static engine base URLs, e.g. ``http://127.0.0.1:8001``."""
    replicas_dns: str | None = None
    """``HOST:PORT`` resolved periodically; every address becomes a replica (Kubernetes headless Service)."""
    health_interval_s: float = Field(default=1.0, gt=0)
    """Period of the background health check and engine-metrics scrape."""
    connect_timeout_s: float = Field(default=2.0, gt=0)
    """Time allowed to open a connection to an engine before it is marked down."""
    health_timeout_s: float = Field(default=5.0, gt=0)
    """Time a health probe may wait for an engine's answer; three slow or failed probes in a row mark
    the replica down (a refused connection marks it down at once)."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Upper bound on waiting for an engine's response bytes (504 when exceeded)."""
    max_attempts: int = Field(default=3, ge=1)
    """Replicas tried for a request that failed before anything was sent to the client."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Larger request bodies get 413."""
    max_tokens_cap: int = Field(default=0, ge=0)
    """Largest ``max_tokens`` accepted (0 = engine decides)."""
    max_prompt_chars: int = Field(default=0, ge=0)
    """Largest prompt (characters over all messages / prompts) accepted (0 = unlimited)."""
    max_prompt_tokens: int = Field(default=0, ge=0)
    """Largest prompt in tokens accepted (0 = unlimited), counted by an engine's ``/tokenize`` as the
    engine will tokenize it (chat template included); the largest prompt of a list counts. When the
    count fails, the request goes on uncounted."""
    max_in_flight: int = Field(default=256, ge=1)
    """Requests forwarded to engines at once; more wait in the queue."""
    max_queue: int = Field(default=1024, ge=0)
    """Requests allowed to wait for a slot; beyond that 503 + Retry-After."""
    queue_timeout_s: float = Field(default=30.0, gt=0)
    """How long a queued request waits for a slot before 503."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty = no authentication. Checked before a body is read."""
    bad_key_limit: int = Field(default=20, ge=0)
    """Missing or wrong keys a client address may send per rolling minute; beyond that every
    request from it gets 429 until the minute has passed (0 = no throttling)."""
    engine_api_key: str | None = None
    """Bearer token sent to the engines on every request (proxied requests, /tokenize, probes):
    the engines' ``SPECSERVE_ENGINE_API_KEY``."""
    expose_replica_addresses: bool = False
    """Name replicas by address in the public ``/ready`` and ``/metrics`` (default: by index)."""
    max_connections: int = Field(default=2048, ge=1)
    """Open client connections at once; more are answered 503 and closed."""
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """Largest request head (request line and headers); larger gets 431."""
    max_header_count: int = Field(default=100, ge=8)
    """Most header fields in a request; more gets 431."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Time a client has to send a request's head, from connecting or from the previous response;
    then 408 and the connection is closed."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """Time a client has to send a request's body once its head is in; then 408 and close."""
    key_limits: KeyLimits = KeyLimits()
    """Rate limits applied to each key (or to each client address when auth is off)."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On shutdown, in-flight requests get this long to finish."""
    spec_policy: SpecPolicy = "fixed"
    """Each request's speculation length: ``goodput`` (chosen per request from load and acceptance)
    or ``fixed`` (requests untouched: the engine's ``num_speculative_tokens``)."""
    routing: Literal["least-loaded", "goodput"] = "least-loaded"
    """Which replica gets a request: the least loaded, or (``goodput``) the one where it adds the
    most predicted goodput, from the cost models the engines export (their per-step ``goodput``
    policy); falls back to the least loaded while some replica exports none."""
    spec_k_max: int = Field(default=GoodputSettings.k_max, ge=0)
    """Largest ``spec_k`` the goodput policy sends (0 = the engine's ``num_speculative_tokens``)."""
    spec_step_base_ms: float = Field(default=GoodputSettings.step_base_s * 1000.0, gt=0)
    """Goodput policy: starting estimate of a decoding step's fixed time (refined online)."""
    spec_step_token_ms: float = Field(default=GoodputSettings.step_token_s * 1000.0, ge=0)
    """Goodput policy: starting estimate of the step time per token the batch verifies."""

    def connection_limits(self) -> ConnectionLimits:
        from specserve.gateway.connections import ConnectionLimits

        return ConnectionLimits(
            max_connections=self.max_connections, max_header_bytes=self.max_header_bytes,
            max_header_count=self.max_header_count, header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s)

    def goodput_settings(self) -> GoodputSettings:
        return GoodputSettings(k_max=self.spec_k_max, step_base_s=self.spec_step_base_ms / 1000.0,
                               step_token_s=self.spec_step_token_ms / 1000.0)

    @model_validator(mode="after")
    def _need_replicas(self) -> GatewayConfig:
        if not self.replicas and not self.replicas_dns:
            raise ValueError("give at least one replica URL or a replicas DNS name")
        return self
