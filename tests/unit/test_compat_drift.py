"""Drift tests for every vLLM compat patch, and plugin registration.

Each patch declares the upstream functions it replaces or relies on (``UPSTREAM``) with the sha256
of their source; these tests fail when the installed vLLM differs, so a vLLM upgrade forces a
review of each patch, and registration warns about the same drift.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from types import ModuleType

import pytest

import specserve_vllm
from specserve_vllm import compat
from specserve_vllm.compat import cpu_expand_kernel, dispatcher_rebind, grammar_validation
from specserve_vllm.compat.upstream import (
    UpstreamFunction,
    parameters_of,
    warn_if_unsupported_vllm,
)


def _patch(name: str) -> ModuleType:
    return importlib.import_module(f"{compat.__name__}.{name}")


UPSTREAM = [
    pytest.param(name, fn, id=f"{name}:{fn.qualname}")
    for name in compat.PATCHES
    for fn in _patch(name).UPSTREAM
]


@pytest.mark.parametrize("name", compat.PATCHES)
def test_every_patch_declares_its_upstream(name: str) -> None:
    upstream = _patch(name).UPSTREAM
    assert upstream and all(isinstance(fn, UpstreamFunction) for fn in upstream)


@pytest.mark.parametrize(("patch", "fn"), UPSTREAM)
def test_upstream_source_unchanged(patch: str, fn: UpstreamFunction) -> None:
    assert fn.digest() == fn.sha256, (
        f"{fn.module}.{fn.qualname} changed upstream: review compat/{patch}.py (what its "
        f"comment says it relies on), then record the new digest {fn.digest()}"
    )


@pytest.mark.parametrize("name", compat.PATCHES)
def test_registration_warns_when_a_patch_drifted(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    patch = _patch(name)
    stale = dataclasses.replace(patch.UPSTREAM[0], sha256="0" * 64)
    monkeypatch.setattr(patch, "UPSTREAM", (stale, *patch.UPSTREAM[1:]))
    with caplog.at_level(logging.WARNING, logger="specserve_vllm.compat.upstream"):
        compat.apply_all()
    warned = [r for r in caplog.records if "changed" in r.getMessage()]
    assert [r.fields["patch"] for r in warned] == [patch.__name__]  # type: ignore[attr-defined]
    assert warned[0].fields["target"] == f"{stale.module}.{stale.qualname}"  # type: ignore[attr-defined]


def test_expand_kernel_replacement_matches_upstream_signature() -> None:
    assert parameters_of(cpu_expand_kernel.expand_kernel_impl) == (
        cpu_expand_kernel.REPLACED.parameters()
    )
    # KernelOverride forwards launch arguments positionally in the kernel's parameter order.
    kernel_params = [name for name, _ in cpu_expand_kernel.KERNEL.parameters()]
    assert kernel_params == [
        "output_ptr", "input_ptr", "cu_num_tokens_ptr", "replace_from", "replace_to",
        "MAX_NUM_TOKENS",
    ]


def test_expand_kernel_binder_reads_the_patched_attribute() -> None:
    source = cpu_expand_kernel.BINDER.source()
    assert '"vllm.v1.sample.rejection_sampler.expand_kernel"' in source
    assert "cpu_tl._expand_kernel_impl" in source


def test_rebind_replacement_matches_upstream_signature() -> None:
    assert parameters_of(dispatcher_rebind.rebind_kernels) == (
        dispatcher_rebind.REPLACED.parameters()
    )
    # register_kernels must reach the rebinding through the module global.
    assert "_rebind_kernels(" in dispatcher_rebind.CALLER.source()


def test_supported_vllm_version() -> None:
    assert warn_if_unsupported_vllm()


def test_register_installs_patches_idempotently() -> None:
    assert {"dispatcher_rebind", "cpu_expand_kernel"} <= set(compat.PATCHES)
    specserve_vllm.register()
    specserve_vllm.register()
    compat.apply_all()
    for name in compat.PATCHES:
        importlib.import_module(f"{compat.__name__}.{name}").apply()

    cpu_tl = importlib.import_module("vllm.utils.cpu_triton_utils")
    dispatcher = importlib.import_module("vllm.triton_utils.dispatcher")
    assert cpu_tl._expand_kernel_impl is cpu_expand_kernel.expand_kernel_impl
    assert dispatcher._rebind_kernels is dispatcher_rebind.rebind_kernels


def test_apply_repoints_an_override_registered_before_the_patch() -> None:
    """If vLLM registered upstream's fallback first, apply() routes the kernel to ours."""
    from vllm.triton_utils.dispatcher import KernelOverride, register_kernels
    from vllm.v1.sample import rejection_sampler

    def stale(*args: object) -> None:
        raise AssertionError("the upstream fallback must not be used")

    stale.__module__ = cpu_expand_kernel.REPLACED.module
    stale.__name__ = cpu_expand_kernel.REPLACED.qualname
    register_kernels({cpu_expand_kernel.KERNEL_NAME: stale})
    assert rejection_sampler.expand_kernel.func is stale

    cpu_expand_kernel.apply()
    cpu_expand_kernel.apply()

    kernel = rejection_sampler.expand_kernel
    assert isinstance(kernel, KernelOverride)
    assert kernel.func is cpu_expand_kernel.expand_kernel_impl
    assert vars(rejection_sampler._expand)["kernel"] is kernel
