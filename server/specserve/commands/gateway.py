"""Run only the gateway in front of existing vLLM engine replicas.

Example:
    specserve gateway --replica http://10.0.0.5:8000 --replica http://10.0.0.6:8000 --port 8080
    specserve gateway --replicas-dns engine-headless.default.svc:8000 --spec-policy goodput
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specserve.gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def _default(field: str) -> Any:
    """``GatewayConfig``'s default for ``field``: each gateway default is written once, there."""
    from specserve.gateway.config import GatewayConfig

    return GatewayConfig.model_fields[field].default


def _limit(field: str) -> Any:
    from specserve.gateway.config import KeyLimits

    return KeyLimits.model_fields[field].default


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve`` and ``gateway`` (listen address, limits, auth)."""
    g = parser.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="address the gateway listens on")
    g.add_argument("--port", type=int, default=8000, help="port the gateway listens on")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted bearer token (repeatable); also SPECSERVE_API_KEYS=k1,k2")
    g.add_argument("--rate-limit-rpm", type=int, default=_limit("requests_per_minute"),
                   help="requests per minute per key (0 = off)")
    g.add_argument("--rate-limit-tpm", type=int, default=_limit("tokens_per_minute"),
                   help="tokens per minute per key (0 = off)")
    g.add_argument("--max-body-bytes", type=int, default=_default("max_body_bytes"))
    g.add_argument("--max-tokens-cap", type=int, default=_default("max_tokens_cap"),
                   help="largest max_tokens accepted (0 = off)")
    g.add_argument("--max-prompt-chars", type=int, default=_default("max_prompt_chars"),
                   help="largest prompt accepted (0 = off)")
    g.add_argument("--max-prompt-tokens", type=int, default=_default("max_prompt_tokens"),
                   help="largest prompt in tokens, counted by the engine's /tokenize (0 = off)")
    g.add_argument("--max-in-flight", type=int, default=_default("max_in_flight"),
                   help="requests at the engines at once")
    g.add_argument("--max-queue", type=int, default=_default("max_queue"),
                   help="requests waiting for a slot before 503")
    g.add_argument("--request-timeout", type=float, default=_default("request_timeout_s"),
                   help="seconds before 504")
    g.add_argument("--drain-timeout", type=float, default=_default("drain_timeout_s"),
                   help="seconds in-flight requests get to finish on shutdown")
    s = parser.add_argument_group("speculation length")
    s.add_argument("--spec-policy", choices=("goodput", "fixed"),
                   default=os.environ.get("SPECSERVE_SPEC_POLICY") or _default("spec_policy"),
                   help="each request's speculation length: goodput = chosen per request from load "
                        "and acceptance, fixed = the engine's (default: $SPECSERVE_SPEC_POLICY or fixed)")
    s.add_argument("--spec-k-max", type=int, default=_default("spec_k_max"),
                   help="largest spec_k the goodput policy sends (0 = the engine's num_speculative_tokens)")
    s.add_argument("--spec-step-base-ms", type=float, default=None,
                   help="goodput policy: start estimate of a decoding step's fixed time, refined online "
                        f"(default {STEP_COST_MS['gpu'][0]}; `serve` on CPU: {STEP_COST_MS['cpu'][0]})")
    s.add_argument("--spec-step-token-ms", type=float, default=None,
                   help="goodput policy: start estimate of step time per token the batch verifies "
                        f"(default {STEP_COST_MS['gpu'][1]}; `serve` on CPU: {STEP_COST_MS['cpu'][1]})")


STEP_COST_MS: dict[str, tuple[float, float]] = {
    "gpu": (_default("spec_step_base_ms"), _default("spec_step_token_ms")),
    "cpu": (7.0, 2.2),
}
"""Start values (ms per step, ms per verified token) of the goodput policy's step-time model.

``cpu`` is the demo model measured on 2 cores (``specserve bench drafters``: 9.1 ms for a 1-token
step, 24.6 ms for 8 tokens, 22 ms for one request with 4 drafts); the model refits online.
"""


def step_costs(args: argparse.Namespace, device: str = "gpu") -> tuple[float, float]:
    """The step-time start values: given flags, else ``device``'s defaults.

    >>> ns = argparse.Namespace(spec_step_base_ms=None, spec_step_token_ms=1.0)
    >>> step_costs(ns, "cpu")
    (7.0, 1.0)
    """
    base, token = STEP_COST_MS.get(device, STEP_COST_MS["gpu"])
    given_base, given_token = args.spec_step_base_ms, args.spec_step_token_ms
    return (base if given_base is None else given_base, token if given_token is None else given_token)


def gateway_config(args: argparse.Namespace, replicas: Sequence[str], dns: str | None = None,
                   device: str = "gpu") -> GatewayConfig:
    from specserve.gateway.config import GatewayConfig, KeyLimits

    step_base_ms, step_token_ms = step_costs(args, device)
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("SPECSERVE_API_KEYS", "").split(",") if k.strip()]
    return GatewayConfig(
        replicas=list(replicas), replicas_dns=dns, api_keys=tuple(keys),
        key_limits=KeyLimits(requests_per_minute=args.rate_limit_rpm,
                             tokens_per_minute=args.rate_limit_tpm),
        max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
        max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
        max_in_flight=args.max_in_flight, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout, spec_policy=args.spec_policy, spec_k_max=args.spec_k_max,
        spec_step_base_ms=step_base_ms, spec_step_token_ms=step_token_ms,
    )


def serve_gateway(
    args: argparse.Namespace, config: GatewayConfig, should_stop: Callable[[], str | None] | None = None
) -> int:
    """Run the gateway with uvicorn until SIGINT/SIGTERM (or ``should_stop`` returns a reason)."""
    import uvicorn

    from specserve.gateway import create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine poll otherwise
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=config.drain_timeout_s, lifespan="on",
    ))
    stopped_for: list[str] = []
    done = threading.Event()

    def watch() -> None:
        announced = False
        while not done.wait(0.5):
            if server.started and not announced:
                announced = True
                log.info("specserve ready", extra={"fields": {
                    "url": f"http://{args.host}:{args.port}/v1", "replicas": config.replicas}})
            reason = should_stop() if should_stop is not None else None
            if reason:
                stopped_for.append(reason)
                log.error("stopping the gateway", extra={"fields": {"reason": reason}})
                server.should_exit = True
                return

    watcher = threading.Thread(target=watch, name="gateway-watch", daemon=True)
    watcher.start()
    try:
        server.run()
    finally:
        done.set()
        watcher.join(timeout=2)
    return 1 if stopped_for else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--replica", action="append", default=[], metavar="URL",
                     help="engine base URL, e.g. http://127.0.0.1:8001 (repeatable)")
    src.add_argument("--replicas-dns", metavar="HOST:PORT",
                     help="DNS name whose addresses are the engine replicas (re-resolved every second)")
    add_gateway_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return serve_gateway(args, gateway_config(args, args.replica, args.replicas_dns))
