"""Greedy outputs through ``specserve serve`` are identical with and without speculation.

Three servers run one after the other (module scope): without speculation, with
``--speculative-config`` n-gram, and with ``--drafter hydra`` (the demo model's heads, found by the
CLI and handed to the engine); the same prompts at temperature 0 must give the same tokens, and
each speculative engine (under `specserve serve`'s default goodput policy) must really have proposed
and accepted drafts.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.specserve_process import FP32, MODEL_NAME, ServeProcess, engine_metrics_when, running_specserve

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
MAX_TOKENS = 48
# Repetitive code makes prompt-lookup drafting fire.
PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n",
    "import os\nimport sys\nimport json\nimport os\nimport sys\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\nclass",
]
CHAT = [{"role": "user", "content": "def f(x):\n    return x\n\ndef f(x):\n    return x"}]


def _generate(server: ServeProcess) -> dict[str, list]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    completions = []
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"return_token_ids": True})
        choice = r.choices[0]
        completions.append([choice.text, getattr(choice, "token_ids", None)])
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                          temperature=0)
    return {"completions": completions, "chat": [chat.choices[0].message.content]}


def _spec_counter(server: ServeProcess, name: str) -> float:
    text = httpx.get(f"{server.engine_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def _drafts(server: ServeProcess) -> dict[str, float]:
    return {"drafted": _spec_counter(server, "vllm:spec_decode_num_draft_tokens"),
            "accepted": _spec_counter(server, "vllm:spec_decode_num_accepted_tokens")}


def _plan_stats(server: ServeProcess) -> dict[str, float]:
    """specserve's plan statistics on the engine's ``/metrics``, once they show the drafter ran."""
    return engine_metrics_when(server, "specserve_engine_",
                               lambda seen: seen.get("specserve_engine_spec_drafter_calls_total", 0) > 0,
                               "a drafter call")


@pytest.fixture(scope="module")
def outputs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    log_dir = tmp_path_factory.mktemp("spec")
    with running_specserve(demo_model_dir, log_dir=log_dir, engine_args=FP32) as plain:
        base = _generate(plain)
    out: dict[str, dict] = {"base": base}
    for name, args in (("ngram", ["--speculative-config", json.dumps(NGRAM)]),
                       ("hydra", ["--drafter", "hydra", "--num-speculative-tokens", "4"])):
        with running_specserve(demo_model_dir, args, log_dir=log_dir, engine_args=FP32) as spec:
            out[name] = _generate(spec)
            out[name]["drafts"] = _drafts(spec)
            if name == "hydra":
                out[name]["plan_stats"] = _plan_stats(spec)
    return out


@pytest.mark.parametrize("drafter", ["ngram", "hydra"])
def test_speculation_is_lossless_at_temperature_zero(outputs: dict[str, dict], drafter: str) -> None:
    base, speculative = outputs["base"], outputs[drafter]
    assert all(text for text, _ in base["completions"])
    assert speculative["completions"] == base["completions"]
    assert speculative["chat"] == base["chat"]


@pytest.mark.parametrize("drafter", ["ngram", "hydra"])
def test_the_speculative_engine_proposed_and_accepted_drafts(outputs: dict[str, dict], drafter: str) -> None:
    drafts = outputs[drafter]["drafts"]
    assert drafts["drafted"] > 0 and drafts["accepted"] > 0


def test_the_engine_exports_its_plan_statistics(outputs: dict[str, dict]) -> None:
    """The per-step planner's counters reach the engine's ``/metrics`` from the engine core."""
    stats = outputs["hydra"]["plan_stats"]
    assert stats["specserve_engine_spec_plans_total"] >= stats["specserve_engine_spec_drafter_calls_total"] > 0
    assert stats["specserve_engine_spec_position_tested_total[('position', '1')]"] > 0
    assert stats["specserve_engine_spec_policy[('policy', 'goodput')]"] == 1  # `specserve serve`'s default
    batch_one = stats["specserve_engine_spec_rows_by_batch_total[('batch', '1')]"]
    assert batch_one > 0  # requests ran one at a time
    assert 0 < stats["specserve_engine_spec_drafts_by_batch_total[('batch', '1')]"] <= 4 * batch_one  # k <= 4
