"""``specserve bench gateway``: pure parts, and ``--gateway-cpus`` on real subprocesses."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from specserve.bench import gateway_overhead
from specserve.commands.bench import BENCHES


def test_registered() -> None:
    assert BENCHES["gateway"][0] == "gateway_overhead"


def test_cpu_lists() -> None:
    assert gateway_overhead.parse_cpus("1") == frozenset({1})
    assert gateway_overhead.parse_cpus("0-2,5") == frozenset({0, 1, 2, 5})
    with pytest.raises(ValueError):
        gateway_overhead.parse_cpus("x")
    with pytest.raises(ValueError, match="not within"):
        gateway_overhead.split_cpus(frozenset({0, 1}), frozenset({7}))
    assert gateway_overhead.split_cpus(frozenset({0, 1, 2}), frozenset({2})) == frozenset({0, 1})


def test_gateway_cpus_needs_fake_engine() -> None:
    parser = argparse.ArgumentParser()
    gateway_overhead.add_arguments(parser)
    args = parser.parse_args(["--gateway", "http://127.0.0.1:9", "--engine", "http://127.0.0.1:9",
                              "--gateway-cpus", "0"])
    with pytest.raises(SystemExit, match="needs --fake-engine"):
        gateway_overhead.run(args)


def test_fake_targets_pin_the_gateway_and_restore_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    """A real fake engine and gateway: the gateway runs on its CPU, the load on the others."""
    own = frozenset(os.sched_getaffinity(0))
    gateway_cpu = frozenset({max(own)})
    if len(own) < 2:  # one CPU: nothing can be left to the load, which must be refused
        with pytest.raises(ValueError, match="at least one CPU"):
            gateway_overhead.split_cpus(own, gateway_cpu)
        return
    with gateway_overhead.fake_targets(0.005, gateway_cpu) as (gateway, engine, pid):
        assert frozenset(os.sched_getaffinity(pid)) == gateway_cpu
        assert frozenset(os.sched_getaffinity(0)) == own - gateway_cpu
        args = argparse.Namespace(
            fake_engine=True, model=None, prompt="x", max_tokens=4, rounds=1, concurrency=2,
            duration=0.5, token_interval=0.005, gateway_cpus=gateway_cpu, gateway=gateway, engine=engine,
        )
        assert gateway_overhead.measure(args, pid) == 0
    assert frozenset(os.sched_getaffinity(0)) == own
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["gateway_cpus"] == sorted(gateway_cpu)
    assert result["client_cpus"] == sorted(own - gateway_cpu)
    assert result["gateway"]["requests"] > 0 and result["gateway"]["errors"] == 0
