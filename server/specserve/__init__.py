"""specserve: OpenAI-compatible serving on vLLM with lossless speculation and structured outputs.

This package is the gateway side (CLI, HTTP gateway, goodput controller, metrics). It must import
without torch or vLLM installed; heavy imports stay inside the functions that need them.
"""

__version__ = "0.1.0"
