"""Engine processes: starting and stopping vLLM's OpenAI server for ``specserve serve``."""

from __future__ import annotations

from specserve.engine.process import EngineError, EngineProcess, EngineSpec, free_port

__all__ = ["EngineError", "EngineProcess", "EngineSpec", "free_port"]
