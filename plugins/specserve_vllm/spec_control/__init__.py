"""Per-step control of draft lengths inside the engine (pure policies; the runner hooks are in
:mod:`specserve_vllm.compat.spec_length` and :mod:`specserve_vllm.compat.no_spec_step`)."""
