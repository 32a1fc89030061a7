"""Correct CPU fallback for the rejection sampler's ``expand_kernel``.

vLLM 0.32.0's CPU fallback ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` passes the C++ op
an int64 *copy* of the output tensor whenever the output is not int64, and never copies back.
The rejection sampler expands per-request temperature (float32), top_k (int32) and top_p
(float32) to per-token tensors through it, so with temperature > 0 those come back as
uninitialised memory: wrong acceptance, or an out-of-bounds crash when top_k/top_p are set.

How the replacement gets used: on CPU, ``CpuPlatform.register_triton_kernel_overrides`` (run in
each worker's ``init_worker`` right after the general plugins load) reads
``cpu_triton_utils._expand_kernel_impl`` when it is called and hands it to
``vllm.triton_utils.dispatcher.register_kernels``, which wraps it in a ``KernelOverride`` bound to
``rejection_sampler.expand_kernel`` and to the warm-up owner ``rejection_sampler._expand``.
So :func:`apply` rebinds that module attribute; if the overrides were already registered with the
broken function (``apply`` called after an engine started), it registers the replacement again.
"""

from __future__ import annotations

import importlib
import logging
import sys

import torch

from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"

REPLACED = UpstreamFunction(
    "vllm.utils.cpu_triton_utils",
    "_expand_kernel_impl",
    "cb72d4d389c5be6da303fd70bfd461aaacb238aa014a853e5fb49523fcd5056d",
)
# Reads the attribute above at call time and registers it for KERNEL_NAME.
BINDER = UpstreamFunction(
    "vllm.platforms.cpu",
    "CpuPlatform.register_triton_kernel_overrides",
    "50dcfa32c93de36b7090af7cb858efe7972edd9524604147ec41b95c22e0429b",
)
# Its parameter order is the order in which KernelOverride forwards launch arguments.
KERNEL = UpstreamFunction(
    "vllm.v1.sample.rejection_sampler",
    "expand_kernel",
    "c89b22e92150c9c6fe19cfa85a0ff5301cdfa61ce86e90f1df04414d6f17e830",
)
UPSTREAM = (REPLACED, BINDER, KERNEL)


def expand_kernel_impl(
    output: torch.Tensor,  # [num_tokens]
    input_val: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size], cumulative token counts
    replace_from: int | float,
    replace_to: int | float,
    MAX_NUM_TOKENS: int | None = None,  # noqa: N803 (the kernel's parameter name)
) -> None:
    """Write each request's value over that request's token span of ``output``, in place.

    Request ``i`` owns ``output[start_i:cu[i]]`` (``start_0 = 0``, ``start_i = cu[i-1]``) and
    fills at most ``MAX_NUM_TOKENS`` positions of it; values equal to ``replace_from`` are
    written as ``replace_to``; positions past the last request's span are left untouched, as in
    the Triton kernel.

    Example: ``input_val=[0.5, -1.0, 2.0]``, ``cu_num_tokens=[2, 5, 6]``,
    ``replace_from=-1, replace_to=1`` gives ``output=[0.5, 0.5, 1.0, 1.0, 1.0, 2.0]``.
    """
    batch_size = input_val.shape[0]
    if batch_size == 0:
        return
    ends = cu_num_tokens.to(device=output.device, dtype=torch.int64)  # [batch_size]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # [batch_size]
    counts = (ends - starts).clamp(min=0)  # [batch_size]
    if MAX_NUM_TOKENS is not None:
        counts = counts.clamp(max=int(MAX_NUM_TOKENS))
    values = torch.where(input_val == replace_from, replace_to, input_val)  # [batch_size]
    req = torch.repeat_interleave(torch.arange(batch_size, device=output.device), counts)
    first = torch.cumsum(counts, 0) - counts  # [batch_size], index in `req` of each start
    offset = torch.arange(req.shape[0], device=output.device) - first[req]  # [n]
    output[starts[req] + offset] = values[req].to(output.dtype)


def _broken_override_active() -> bool:
    """True if the dispatcher already routes ``expand_kernel`` to upstream's fallback."""
    sampler = sys.modules.get("vllm.v1.sample.rejection_sampler")
    if sampler is None:
        return False
    from vllm.triton_utils.dispatcher import KernelOverride

    kernel = getattr(sampler, "expand_kernel", None)
    if not isinstance(kernel, KernelOverride):
        return False
    impl = kernel.func
    return impl is not expand_kernel_impl and (
        getattr(impl, "__module__", None) == REPLACED.module
        and getattr(impl, "__name__", None) == REPLACED.qualname
    )


def apply() -> None:
    """Install :func:`expand_kernel_impl` as vLLM's CPU ``expand_kernel`` fallback (idempotent)."""
    module = importlib.import_module(REPLACED.module)
    if getattr(module, REPLACED.qualname) is not expand_kernel_impl:
        setattr(module, REPLACED.qualname, expand_kernel_impl)
        logger.debug("installed the CPU expand_kernel fallback")
    if _broken_override_active():
        from vllm.triton_utils.dispatcher import register_kernels

        register_kernels({KERNEL_NAME: expand_kernel_impl})
