"""A small in-process vLLM engine with the settings that make it fast on a few CPU cores.

Benchmarks and tests start engines this way (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and
``OMP_NUM_THREADS`` set by the caller); vLLM is imported only when an engine is made.

Example:
    >>> engine_kwargs(max_num_seqs=8)["max_num_seqs"], engine_kwargs()["enforce_eager"]
    (8, True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SMALL_ENGINE: dict[str, Any] = {
    "enforce_eager": True,  # torch.compile costs ~80 s at first start on CPU
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_seqs": 4,
    "seed": 0,
}


def engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """:data:`SMALL_ENGINE` with ``overrides`` applied."""
    return {**SMALL_ENGINE, **overrides}


def local_llm(model: str | Path, **overrides: Any) -> Any:
    """``vllm.LLM`` on ``model`` with :data:`SMALL_ENGINE` settings plus ``overrides``."""
    from vllm import LLM

    return LLM(model=str(model), **engine_kwargs(**overrides))


def worker_runner(worker: Any) -> Any:
    """The model runner of a vLLM worker, wrapped or not (what ``collective_rpc`` callables read)."""
    return getattr(worker, "worker", worker).model_runner


def model_runner(llm: Any) -> Any:
    """The model runner of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker)."""
    return llm.collective_rpc(worker_runner)[0]
