"""Run only the gateway in front of existing vLLM engine replicas.

Example:
    specserve gateway --replica http://10.0.0.5:8000 --replica http://10.0.0.6:8000 --port 8080
    specserve gateway --replicas-dns engine-headless.default.svc:8000 --spec-policy goodput
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
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
    g.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="file of accepted bearer tokens, one per line (blank lines and # comments "
                        "ignored; repeatable). Also $SPECSERVE_API_KEYS=k1,k2. Prefer these to --api-key")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted bearer token (repeatable). Anyone on the host can read it in the "
                        "process list (ps): prefer --api-key-file or $SPECSERVE_API_KEYS")
    g.add_argument("--allow-unauthenticated", action="store_true",
                   default=_env_flag("SPECSERVE_ALLOW_UNAUTHENTICATED"),
                   help="serve without API keys on an address beyond loopback (refused otherwise; "
                        "also $SPECSERVE_ALLOW_UNAUTHENTICATED=1)")
    g.add_argument("--bad-key-limit", type=int, default=_default("bad_key_limit"),
                   help="wrong or missing keys per client address per minute before 429 (0 = off)")
    g.add_argument("--engine-api-key-file", default=None, metavar="PATH",
                   help="file holding the key sent to the engines (their $SPECSERVE_ENGINE_API_KEY); "
                        "also $SPECSERVE_ENGINE_API_KEY")
    g.add_argument("--expose-replica-addresses", action="store_true",
                   help="name engines by address in the public /ready and /metrics (default: by index)")
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
    g.add_argument("--health-timeout", type=float, default=_default("health_timeout_s"),
                   help="seconds a health probe waits for an engine; 3 slow probes in a row mark it down")
    h = parser.add_argument_group("client connections")
    h.add_argument("--max-connections", type=int, default=_default("max_connections"),
                   help="open client connections at once; more are answered 503 and closed")
    h.add_argument("--max-header-bytes", type=int, default=_default("max_header_bytes"),
                   help="largest request head (request line + headers); larger gets 431")
    h.add_argument("--max-header-count", type=int, default=_default("max_header_count"),
                   help="most headers a request may have (431)")
    h.add_argument("--header-timeout", type=float, default=_default("header_timeout_s"),
                   help="seconds a client has to send a request's head (408, then closed)")
    h.add_argument("--body-timeout", type=float, default=_default("body_timeout_s"),
                   help="seconds a client has to send a request's body once its head is in (408)")
    s = parser.add_argument_group("speculation length")
    s.add_argument("--spec-policy", choices=("goodput", "fixed"),
                   default=os.environ.get("SPECSERVE_SPEC_POLICY") or _default("spec_policy"),
                   help="each request's speculation length: goodput = chosen per request from load "
                        "and acceptance, fixed = the engine's (default: $SPECSERVE_SPEC_POLICY or fixed)")
    s.add_argument("--routing", choices=("least-loaded", "goodput"), default=_default("routing"),
                   help="which replica gets a request: the least loaded, or the one where it adds the most "
                        "predicted goodput (needs engines under --engine-spec-policy goodput)")
    s.add_argument("--spec-k-max", type=int, default=_default("spec_k_max"),
                   help="largest spec_k the goodput policy sends (0 = the engine's num_speculative_tokens)")
    s.add_argument("--spec-step-base-ms", type=float, default=None,
                   help="goodput policy: start estimate of a decoding step's fixed time, refined online "
                        f"(default {STEP_COST_MS['gpu'][0]}; `serve` on CPU: {STEP_COST_MS['cpu'][0]})")
    s.add_argument("--spec-step-token-ms", type=float, default=None,
                   help="goodput policy: start estimate of step time per token the batch verifies "
                        f"(default {STEP_COST_MS['gpu'][1]}; `serve` on CPU: {STEP_COST_MS['cpu'][1]})")
    m = parser.add_argument_group("metrics")
    m.add_argument("--metrics-port", type=int, default=0,
                   help="also serve /metrics on this port, same --host (0 = off), so that scrapers reach "
                        "metrics on a port that no ingress routes")


STEP_COST_MS: dict[str, tuple[float, float]] = {
    "gpu": (_default("spec_step_base_ms"), _default("spec_step_token_ms")),
    "cpu": (7.0, 2.2),
}
"""Start values (ms per step, ms per verified token) of the goodput policy's step-time model.

``cpu`` is the demo model measured on 2 cores (``specserve bench drafters``: 9.1 ms for a 1-token
step, 24.6 ms for 8 tokens, 22 ms for one request with 4 drafts); the model refits online.
"""


def _env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_key_file(path: str) -> list[str]:
    """The keys of a key file: one a line; blank lines and ``#`` comments ignored.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        ...     _ = f.write("# team a\\nsk-a  \\n\\n  sk-b # rotated 2026-11\\n")
        >>> read_key_file(f.name)
        ['sk-a', 'sk-b']
    """
    keys = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key = line.split("#", 1)[0].strip()
            if key:
                keys.append(key)
    return keys


def client_keys(args: argparse.Namespace) -> list[str]:
    """Accepted client keys: ``--api-key``, each ``--api-key-file``, ``$SPECSERVE_API_KEYS``."""
    keys = list(args.api_key)
    for path in args.api_key_file:
        keys += read_key_file(path)
    keys += [k.strip() for k in os.environ.get("SPECSERVE_API_KEYS", "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def engine_key(args: argparse.Namespace) -> str | None:
    """The key the gateway sends to engines: ``--engine-api-key-file`` or
    ``$SPECSERVE_ENGINE_API_KEY`` (``None``: engines without a key)."""
    if args.engine_api_key_file:
        keys = read_key_file(args.engine_api_key_file)
        if len(keys) != 1:
            raise ValueError(f"{args.engine_api_key_file} must hold exactly one key, not {len(keys)}")
        return keys[0]
    return os.environ.get("SPECSERVE_ENGINE_API_KEY", "").strip() or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback("0.0.0.0")
        (True, True, True, False)
    """
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_listener(host: str, keys: Sequence[str], allow_unauthenticated: bool) -> str | None:
    """Why the gateway must not start: listening beyond loopback without keys, not allowed."""
    if keys or allow_unauthenticated or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without API keys: anyone who reaches it could use the "
            "engines. Give keys (--api-key-file PATH, or $SPECSERVE_API_KEYS), listen on 127.0.0.1, "
            "or pass --allow-unauthenticated ($SPECSERVE_ALLOW_UNAUTHENTICATED=1) to serve open "
            "on purpose")


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
                   device: str = "gpu", engine_api_key: str | None = None) -> GatewayConfig:
    """The gateway's config from its flags; ``engine_api_key`` overrides the flag/env one."""
    from specserve.gateway.config import GatewayConfig, KeyLimits

    step_base_ms, step_token_ms = step_costs(args, device)
    return GatewayConfig(
        replicas=list(replicas), replicas_dns=dns, api_keys=tuple(client_keys(args)),
        bad_key_limit=args.bad_key_limit, engine_api_key=engine_api_key or engine_key(args),
        expose_replica_addresses=args.expose_replica_addresses,
        max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
        max_header_count=args.max_header_count, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        key_limits=KeyLimits(requests_per_minute=args.rate_limit_rpm,
                             tokens_per_minute=args.rate_limit_tpm),
        max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
        max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
        max_in_flight=args.max_in_flight, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout, health_timeout_s=args.health_timeout, spec_policy=args.spec_policy, routing=args.routing, spec_k_max=args.spec_k_max,
        spec_step_base_ms=step_base_ms, spec_step_token_ms=step_token_ms,
    )


def start_metrics_server(app: Any, host: str, port: int) -> Callable[[], None]:
    """Serve the gateway's /metrics on its own ``port`` (a thread); returns the function that stops it.

    The queue-depth gauge, set at each scrape of the main port's /metrics, is read live here.
    """
    from prometheus_client import start_http_server

    gw = app.state.gateway
    gw.metrics.queue_depth.set_function(lambda: gw.queue.waiting)
    server, thread = start_http_server(port, addr=host, registry=gw.metrics.registry)
    log.info("metrics listening", extra={"fields": {"url": f"http://{host}:{port}/metrics"}})

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

    return stop


def bind_listener(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound (not yet listening) to ``host:port``; OSError when taken.

    ``specserve serve`` binds it before it starts the engine: a taken port fails in a second rather
    than after the model has loaded, and the engine's own sockets (bound to port 0 while it starts)
    cannot be given it. Connections are refused until the gateway serves.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_gateway(
    args: argparse.Namespace, config: GatewayConfig, should_stop: Callable[[], str | None] | None = None,
    listener: socket.socket | None = None,
) -> int:
    """Run the gateway with uvicorn until SIGINT/SIGTERM (or ``should_stop`` returns a reason), on
    ``listener`` when given (see :func:`bind_listener`), else on a socket uvicorn binds."""
    import uvicorn

    from specserve.gateway import create_app

    from specserve.gateway.connections import guarded_protocol

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine poll otherwise
    app = create_app(config)
    stop_metrics = start_metrics_server(app, args.host, args.metrics_port) if args.metrics_port else None
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=config.drain_timeout_s, lifespan="on",
        http=guarded_protocol(config.connection_limits()),
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
        server.run(sockets=[listener] if listener is not None else None)
    finally:
        done.set()
        watcher.join(timeout=2)
        if stop_metrics is not None:
            stop_metrics()
    return 1 if stopped_for else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--replica", action="append", default=[], metavar="URL",
                     help="engine base URL, e.g. http://127.0.0.1:8001 (repeatable)")
    src.add_argument("--replicas-dns", metavar="HOST:PORT",
                     help="DNS name whose addresses are the engine replicas (re-resolved every second)")
    add_gateway_arguments(parser)


def check_listener(args: argparse.Namespace) -> bool:
    """Log why the gateway must not start on ``args.host`` and return False; True when it may."""
    why = refuse_open_listener(args.host, client_keys(args), args.allow_unauthenticated)
    if why is not None:
        log.error(why)
        return False
    if not client_keys(args) and not is_loopback(args.host):
        log.warning("serving without API keys on purpose", extra={"fields": {"host": args.host}})
    return True


def run(args: argparse.Namespace) -> int:
    try:
        if not check_listener(args):
            return 2
        config = gateway_config(args, args.replica, args.replicas_dns)
    except (OSError, ValueError) as exc:
        log.error("bad gateway options", extra={"fields": {"error": str(exc)}})
        return 2
    return serve_gateway(args, config)
