"""The gateway's per-request and per-chunk shortcuts give what the plain versions gave."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers

from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.proxy import _DROP_HEADERS, Proxy, Tail

NAMES = st.sampled_from([b"host", b"content-length", b"authorization", b"x-request-id", b"accept",
                         b"x-custom", b"user-agent", b"connection"])


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=40), st.integers(1, 5000))
def test_tail_is_the_last_bytes(chunks: list[bytes], size: int) -> None:
    tail = Tail(size)
    window = b""
    for chunk in chunks:
        tail.add(chunk)
        window = (window + chunk)[-size:]
    assert tail.value() == window


@given(st.lists(st.tuples(NAMES, st.text("abc-_ 09", max_size=8).map(str.encode)), max_size=12))
def test_forward_headers_match_a_dict_of_the_request_headers(raw: list[tuple[bytes, bytes]]) -> None:
    plain = {k: v for k, v in dict(Headers(raw=raw)).items() if k.lower() not in _DROP_HEADERS}
    assert Proxy.forward_headers(raw) == plain


def test_metric_children_are_the_labelled_metrics() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.child(metrics.requests, "/v1/completions", "200", "m").inc()
    metrics.child(metrics.requests, "/v1/completions", "200", "m").inc()
    assert metrics.requests.labels(route="/v1/completions", status="200", model="m")._value.get() == 2
