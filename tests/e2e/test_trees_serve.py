"""``specserve serve --drafter hydra --tree dynamic --tree-budget 8 --engine-spec-policy fixed`` on the
demo model (4 heads), through the ``openai`` client: the engine verifies trees of more nodes than there are heads, and
the response's speculative metrics count each step's drafted nodes and accepted path; a regex-constrained
request verifies grammar-pruned trees (across the engine core and worker processes) and matches its regex.

Greedy equality of trees with no speculation is tested on the real engine in fp32
(``tests/integration/test_trees_engine.py``); a served engine runs in vLLM's CPU default, bf16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai

from support.specserve_process import MODEL_NAME, engine_metrics_when, running_specserve

BUDGET, HEADS = 8, 4
# Fixed lengths: the served default, goodput, takes chains where trees do not pay on this CPU
# (goodput with trees: tests/integration/test_trees_engine.py).
ARGS = ["--drafter", "hydra", "--tree", "dynamic", "--tree-budget", str(BUDGET), "--engine-spec-policy", "fixed"]
PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"
REGEX = r"[a-z_ .()=,:+\n]{1,200}"


def test_served_trees_exceed_the_heads_and_report_each_steps_path(demo_model_dir: Path, tmp_path: Path) -> None:
    with running_specserve(demo_model_dir, ARGS, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        raw = client.completions.with_raw_response.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=48,
                                                          temperature=0)
        completion = raw.parse()
        body: dict[str, Any] = raw.http_response.json()
        counters = engine_metrics_when(
            server, "specserve_engine_tree",
            lambda seen: seen.get("specserve_engine_tree_verifications_total", 0) > 0, "a verified tree")
    spec = body["metrics"]["speculative_decoding"]
    drafted, accepted = spec["per_step_drafted"], spec["per_step_accepted"]
    assert completion.choices[0].text and len(drafted) == len(accepted) == spec["num_spec_steps"] > 0
    assert spec["num_spec_tokens"] == BUDGET  # --tree-budget became the engine's draft slots
    assert HEADS < max(drafted) <= BUDGET  # trees wider than the heads' chain
    assert max(accepted) <= HEADS  # an accepted path is at most as deep as the heads
    assert sum(drafted) == spec["num_draft_tokens"] and sum(accepted) == spec["num_accepted_draft_tokens"]
    steps = spec["num_spec_steps"]
    assert abs(spec["mean_acceptance_length"] - (sum(accepted) + steps) / steps) < 1e-3
    assert float(raw.headers["x-specserve-spec-k-max"]) == max(drafted)
    assert counters["specserve_engine_tree_verifications_total"] >= 1
    # Steps whose tree came out a chain verify as chains and are not counted as tree steps.
    assert counters["specserve_engine_tree_accepted_nodes_total"] <= sum(accepted)


def test_served_structured_outputs_verify_grammar_pruned_trees(demo_model_dir: Path, tmp_path: Path) -> None:
    with running_specserve(demo_model_dir, ARGS, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=48, temperature=0,
                                               extra_body={"structured_outputs": {"regex": REGEX}})
        counters = engine_metrics_when(
            server, "specserve_engine_tree",
            lambda seen: seen.get("specserve_engine_tree_grammar_verifications_total", 0) > 0,
            "a verified grammar-pruned tree")
    text = completion.choices[0].text
    assert text and re.fullmatch(REGEX, text), text
    assert counters["specserve_engine_tree_grammar_verifications_total"] <= counters[
        "specserve_engine_tree_verifications_total"]
