"""Drafters: the algorithms that propose draft tokens for speculative decoding.

Pure algorithm modules (no vLLM imports) live here next to the thin vLLM-facing proposer classes
that wrap them. Patches of vLLM internals that feed drafters live in :mod:`specserve_vllm.compat`.
"""
