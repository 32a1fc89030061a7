"""Per-request speculation length (``extra_args["spec_k"]``) on the real vLLM engine (CPU).

Four requests share every batch: engine default, ``spec_k=0``, ``1`` and ``3``. vLLM's own
per-request speculative metrics (``per_request_spec_decode_metrics="detailed"``) record how many
tokens were drafted for each request at every step, which is the evidence checked here.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specserve.engine.local import local_llm

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

K = 4
MAX_TOKENS = 48
PROMPT = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\n"
PROMPTS = [PROMPT, PROMPT, PROMPT, "for i in range(3):\n    print(i)\nfor i in range(3):\n"]
SPEC_KS: list[int | None] = [None, 0, 1, 3]
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _engine(model_dir: Path, speculative_config: dict[str, Any] | None) -> Any:
    return local_llm(
        model_dir,
        speculative_config=speculative_config, dtype="float32",  # equality tests run in fp32
        per_request_spec_decode_metrics="detailed" if speculative_config else "none",
    )


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


def _params(spec_k: Any) -> Any:
    from vllm import SamplingParams

    extra = None if spec_k is None else {"spec_k": spec_k}
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)


@pytest.fixture(scope="module")
def engines(demo_model_dir: Path) -> Iterator[dict[str, Any]]:
    llm = _engine(demo_model_dir, None)
    baseline = [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, _params(None), use_tqdm=False)]
    del llm
    gc.collect()
    llm = _engine(demo_model_dir, NGRAM)
    outputs = [r.outputs[0] for r in llm.generate(PROMPTS, [_params(k) for k in SPEC_KS], use_tqdm=False)]
    yield {"baseline": baseline, "outputs": outputs, "llm": llm}
    del llm
    gc.collect()


def test_each_request_drafts_at_most_its_spec_k(engines: dict[str, Any]) -> None:
    metrics = [o.spec_decode_metrics.to_dict() for o in engines["outputs"]]
    default, off, one, three = metrics
    assert off["num_draft_tokens"] == 0 and off["num_spec_steps"] == 0
    assert max(one["per_step_drafted"]) == 1
    assert max(three["per_step_drafted"]) == 3
    assert max(default["per_step_drafted"]) == K
    # Same prompt, different caps in the same batches: drafts per step differ accordingly.
    assert all(0 <= d <= 1 for d in one["per_step_drafted"])
    assert all(0 <= d <= 3 for d in three["per_step_drafted"])
    assert _mean(one["per_step_drafted"]) < _mean(three["per_step_drafted"])
    assert one["num_accepted_draft_tokens"] > 0


def test_greedy_outputs_identical_to_no_speculation(engines: dict[str, Any]) -> None:
    assert [list(o.token_ids) for o in engines["outputs"]] == engines["baseline"]


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_invalid_spec_k_is_rejected_and_the_engine_keeps_serving(engines: dict[str, Any], bad: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    llm = engines["llm"]
    with pytest.raises(VLLMValidationError, match="spec_k"):
        llm.generate([PROMPT], _params(bad), use_tqdm=False)
    again = llm.generate([PROMPT], _params(2), use_tqdm=False)[0].outputs[0]
    assert list(again.token_ids) == engines["baseline"][0]
