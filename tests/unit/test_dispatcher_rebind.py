"""Kernel-override rebinding skips objects that fake ``__dict__``."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import pytest

from specserve_vllm.compat.dispatcher_rebind import rebind_kernels


class _Owner:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._kernel_arg_names = ("stale",)


class _FakeDict:
    """Answers every attribute, ``__dict__`` included, with a non-mapping (like llvmlite's lib)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def kernel(x: int) -> int:
    return x


def wrapper(x: int) -> int:
    return -x


def test_rebinds_copies_and_owners_and_skips_fake_namespaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = types.ModuleType("specserve_test_kernel_holder")
    holder.copied = kernel  # type: ignore[attr-defined]
    holder.owner = _Owner(kernel)  # type: ignore[attr-defined]
    holder.fake = _FakeDict()  # type: ignore[attr-defined]
    holder.other = _Owner(len)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, holder.__name__, holder)

    rebind_kernels([(kernel, wrapper)])

    assert holder.copied is wrapper
    assert holder.owner.kernel is wrapper
    assert "_kernel_arg_names" not in vars(holder.owner)
    assert holder.other.kernel is len
    assert vars(holder.other)["_kernel_arg_names"] == ("stale",)


def test_survives_llvmlite_in_sys_modules() -> None:
    """llvmlite (imported by numba, e.g. for the ngram drafter) is what broke upstream's scan."""
    import llvmlite.binding.ffi as ffi

    assert not isinstance(vars(ffi.lib), dict)  # the trigger is present in this process

    rebind_kernels([(kernel, wrapper)])  # scans every module without raising


def test_upstream_scan_fails_where_the_replacement_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Documents the upstream bug; fails (and should be revisited) once upstream fixes it."""
    from specserve_vllm.compat.dispatcher_rebind import REPLACED

    # Rebuild upstream's function from its installed source (the live attribute is patched).
    scope = dict(vars(importlib.import_module(REPLACED.module)))
    exec(compile(REPLACED.source(), "<upstream>", "exec"), scope)
    upstream = scope[REPLACED.qualname]
    holder = types.ModuleType("specserve_test_fake_holder")
    holder.fake = _FakeDict()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, holder.__name__, holder)

    with pytest.raises(AttributeError):
        upstream([(kernel, wrapper)])
    rebind_kernels([(kernel, wrapper)])
