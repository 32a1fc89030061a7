"""Count the engine core's calls for drafts on a multiprocess engine (run as a script).

``python -m support.draft_rpc DRAFTER`` builds a ``vllm.LLM`` with its engine core and worker in
their own processes (the CPU default), counts in the worker how often the engine core called
``take_draft_token_ids`` over RPC while greedy requests ran (``spec_k`` 0 and the engine's k),
and prints ``{"rpc_calls", "steps", "verified", "outputs"}`` as JSON (the last line of stdout).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

CALLS = "_specserve_test_draft_rpcs"


def install_counter(worker: Any) -> None:
    """Count calls of the worker's ``take_draft_token_ids`` (the RPC's entry point)."""
    cls = type(getattr(worker, "worker", worker))  # the wrapper forwards RPCs to the worker
    if getattr(cls, CALLS, None) is not None:
        return
    original = cls.take_draft_token_ids
    setattr(cls, CALLS, 0)

    def counted(self: Any) -> Any:
        setattr(cls, CALLS, getattr(cls, CALLS) + 1)
        return original(self)

    cls.take_draft_token_ids = counted


def read_counter(worker: Any) -> dict[str, int]:
    """RPC calls counted, steps planned and first draft positions verified in this worker."""
    from specserve.engine.local import worker_runner

    planner = getattr(worker_runner(worker), "_specserve_planner", None)
    cls = type(getattr(worker, "worker", worker))
    return {"rpc_calls": int(getattr(cls, CALLS, 0)), "steps": int(planner.stats.steps if planner else 0),
            "verified": int(planner.stats.position_trials[0]) if planner and planner.stats.position_trials else 0}


def main(drafter: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the counter functions travel by pickle
    from vllm import SamplingParams

    from specserve.demo import demo_model_dir
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    from specserve.engine import settings
    from specserve.head_training import demo_heads_dir

    heads = str(demo_heads_dir(drafter)) if drafter in ("medusa", "hydra") else settings.current().heads_dir
    with settings.override(heads_dir=heads):  # the environment carries it to the worker process
        llm = local_llm(demo_model_dir(), max_num_seqs=4, dtype="float32",
                        speculative_config=speculative_config(drafter, 4))
    llm.collective_rpc(install_counter)
    prompts = ["def fibonacci(n):", "The capital of France is", "import os\nimport sys\n"]
    outputs = []
    for spec_k in (0, None):
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                extra_args=None if spec_k is None else {"spec_k": spec_k})
        outputs.append([list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)])
    counts = llm.collective_rpc(read_counter)[0]
    sys.stdout.write(json.dumps({**counts, "outputs": outputs}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
