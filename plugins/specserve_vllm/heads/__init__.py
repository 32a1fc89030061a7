"""Medusa and Hydra draft heads: modules, checkpoint format, vLLM registration and proposer.

A head checkpoint is a directory with ``config.json`` (:class:`~.config.HeadsConfig`) and
``heads.safetensors``. Heads read the target's last hidden state (after the final norm) and
score tokens with the target's own LM head, so a checkpoint holds only the heads' weights.
"""
