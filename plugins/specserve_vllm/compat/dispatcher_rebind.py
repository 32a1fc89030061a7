"""Kernel-override rebinding that survives foreign objects in ``sys.modules``.

vLLM 0.32.0's ``vllm.triton_utils.dispatcher._rebind_kernels`` scans every module namespace and
reads ``vars(value).get("kernel")`` for each attribute value that has a ``__dict__``. Some objects
answer ``__dict__`` through ``__getattr__`` with something that is not a mapping: once numba has
imported llvmlite, ``llvmlite.binding.ffi.lib`` returns a ``_lib_fn_wrapper``, and the scan dies
with ``'_lib_fn_wrapper' object has no attribute 'get'``. On CPU the scan runs at every worker
start, so in a process that has run an ngram engine (numba) any later engine fails to start.

:func:`rebind_kernels` does the same rebinding and skips objects whose instance namespace cannot
be read as a mapping. ``register_kernels`` looks ``_rebind_kernels`` up as a module global at call
time, so rebinding that global is enough.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

REPLACED = UpstreamFunction(
    "vllm.triton_utils.dispatcher",
    "_rebind_kernels",
    "cf0abca713ebb42d7a5d2577f2975957eeaec1015bc981c398c7a90b2fc3959c",
)
# Calls `_rebind_kernels` through the module global.
CALLER = UpstreamFunction(
    "vllm.triton_utils.dispatcher",
    "register_kernels",
    "70d011edd25251a7ca402bfde6b6604f89531d532e2b547678e3b2875c5510af",
)
UPSTREAM = (REPLACED, CALLER)


def _instance_namespace(value: Any) -> Mapping[str, Any] | None:
    """``vars(value)`` when it is a real mapping, else None (no ``__dict__``, or a fake one)."""
    try:
        namespace = vars(value)
    except (TypeError, AttributeError):
        return None
    # llvmlite's `lib` answers `__dict__` through `__getattr__` with a function wrapper.
    return namespace if isinstance(namespace, Mapping) else None


def rebind_kernels(overrides: list[tuple[Callable[..., Any], Any]]) -> None:
    """Point every reference to each original kernel at its override wrapper.

    Two kinds of holders besides the defining module (which ``register_kernels`` patches itself):
    module attributes that copied the kernel (``from mod import kernel``), rebound to the
    wrapper; and JIT warm-up owners whose instance attribute ``kernel`` is the original, swapped
    and their cached ``_kernel_arg_names`` dropped. Values are compared by identity only.

    Example: with ``overrides=[(k, w)]`` and a module ``m`` where ``m.k is k`` and
    ``m.owner.kernel is k``, afterwards ``m.k is w`` and ``m.owner.kernel is w``.
    """
    originals = list(overrides)

    def lookup(value: Any) -> Any:
        for original, wrapper in originals:
            if value is original:
                return wrapper
        return None

    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for attr, value in list(namespace.items()):
            wrapper = lookup(value)
            if wrapper is not None:
                setattr(module, attr, wrapper)
                continue
            instance = _instance_namespace(value)
            if instance is None:
                continue
            wrapper = lookup(instance.get("kernel"))
            if wrapper is None:
                continue
            value.kernel = wrapper
            if not isinstance(value, type):
                value.__dict__.pop("_kernel_arg_names", None)


def apply() -> None:
    """Install :func:`rebind_kernels` as the dispatcher's ``_rebind_kernels`` (idempotent)."""
    module = importlib.import_module(REPLACED.module)
    if getattr(module, REPLACED.qualname) is rebind_kernels:
        return
    setattr(module, REPLACED.qualname, rebind_kernels)
    logger.debug("installed the kernel-override rebinding")
