"""Facts about the upstream vLLM code that the compat patches replace or rely on.

A patch records, for every upstream function it replaces or depends on, the sha256 of that
function's source text as shipped in the supported vLLM release. The source is read from the
installed file (not from the live attribute), so the check gives the same answer before and after
a patch has been applied. Every patch module declares its functions once, as
``UPSTREAM: tuple[UpstreamFunction, ...]``; :func:`specserve_vllm.compat.apply_all` warns for each
one that drifted, and one parametrised test fails on it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_SERIES = "0.32."


@functools.lru_cache(maxsize=32)
def _parsed_module(module: str) -> tuple[str, ast.Module]:
    """The installed source of ``module`` and its syntax tree (parsed once per process: several
    patches check functions of the same large modules at every registration)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module} not found")
    text = Path(spec.origin).read_text(encoding="utf-8")
    return text, ast.parse(text)


@dataclass(frozen=True)
class UpstreamFunction:
    """One function (or method, ``Class.method``) in an upstream vLLM module.

    Example: ``UpstreamFunction("vllm.triton_utils.dispatcher", "_rebind_kernels", "ab12...")``.
    """

    module: str
    """Dotted module name, e.g. ``vllm.utils.cpu_triton_utils``."""
    qualname: str
    """Name inside the module; ``Class.method`` for methods."""
    sha256: str
    """Digest of the definition's source text in the supported vLLM release."""

    def _definition(self) -> tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]:
        text, tree = _parsed_module(self.module)
        body: list[ast.stmt] = tree.body
        parts = self.qualname.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            wanted = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
            node = next(
                (n for n in body if isinstance(n, wanted) and n.name == part),
                None,
            )
            if node is None:
                raise LookupError(f"{self.module}.{self.qualname} not found")
            if last:
                assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                return text, node
            assert isinstance(node, ast.ClassDef)
            body = node.body
        raise LookupError(f"{self.module}.{self.qualname} not found")

    def source(self) -> str:
        """The definition's source text as installed (decorators excluded)."""
        text, node = self._definition()
        segment = ast.get_source_segment(text, node)
        if segment is None:
            raise LookupError(f"no source for {self.module}.{self.qualname}")
        return segment

    def digest(self) -> str:
        return hashlib.sha256(self.source().encode("utf-8")).hexdigest()

    def drifted(self) -> bool:
        return self.digest() != self.sha256

    def parameters(self) -> tuple[tuple[str, bool], ...]:
        """``(name, has_default)`` for each parameter of the installed definition."""
        _, node = self._definition()
        args = node.args
        positional = args.posonlyargs + args.args
        first_default = len(positional) - len(args.defaults)
        params = [(a.arg, i >= first_default) for i, a in enumerate(positional)]
        params += [
            (a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)
        ]
        return tuple(params)

    def load(self) -> Any:
        """The live object now bound to this name (possibly a patched replacement)."""
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


RUNNER = "vllm.v1.worker.gpu_model_runner"

PROPOSE_DRAFT_TOKEN_IDS = UpstreamFunction(
    RUNNER, "GPUModelRunner.propose_draft_token_ids",
    "e44b96f31942673620ebf3630c09d50fe3e4fbab9521602d6de388c404acc2d2")
"""The runner's drafting step, which ``spec_length`` and ``hidden_feed`` both wrap."""

PREPARE_INPUTS = UpstreamFunction(
    RUNNER, "GPUModelRunner._prepare_inputs",
    "555a08b216e197714c49835c0e7d5b4d82bf89c0e3ac05bb55299abcc964a125")
"""Wrapped by ``logits_feed`` (its ``logits_indices``) and ``no_spec_step``; ``hidden_feed`` relies on
its row layout."""

SAMPLE = UpstreamFunction(
    RUNNER, "GPUModelRunner._sample",
    "e00bd57221003822e51f31e2e1702e978cd1d79a5ca9f403bc2a0ff9f21d6dfb")
"""The plain/rejection sampling choice: wrapped by ``logits_feed``, relied on by ``no_spec_step``."""

SAMPLE_TOKENS = UpstreamFunction(
    RUNNER, "GPUModelRunner.sample_tokens",
    "31c5090a90c39dc7904f105a8620a3623383efd82cce8935e91cc60e853c8721")
"""A step's sampling then drafting: wrapped by ``step_timer``, relied on by ``logits_feed`` and
``no_spec_step``."""


def parameters_of(fn: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """``(name, has_default)`` for each parameter of ``fn``, comparable to
    :meth:`UpstreamFunction.parameters`."""
    return tuple(
        (p.name, p.default is not inspect.Parameter.empty)
        for p in inspect.signature(fn).parameters.values()
    )


def argument_reader(fn: Callable[..., Any], names: tuple[str, ...]) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]:
    """A reader of ``names`` from the ``(args, kwargs)`` a wrap of method ``fn`` receives
    (``args`` without ``self``). Positions are resolved once, so a call costs a few lookups, not
    ``inspect.Signature.bind`` (which wraps run on every engine step).

    >>> def f(self, a, b, c=0): ...
    >>> read = argument_reader(f, ("c", "a"))
    >>> read((1, 2, 3), {}), read((1,), {"b": 2, "c": 5})
    ((3, 1), (5, 1))
    """
    params = list(inspect.signature(fn).parameters)
    where = tuple((name, params.index(name) - 1) for name in names)

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(args[i] if i < len(args) else kwargs[name] for name, i in where)

    return read


def warn_if_drifted(patch: str, functions: tuple[UpstreamFunction, ...]) -> bool:
    """Log a warning for each function whose installed source differs from the recorded one."""
    drifted = False
    for fn in functions:
        try:
            changed = fn.drifted()
        except (LookupError, OSError, SyntaxError) as exc:
            changed = True
            logger.warning(
                "upstream code for a compat patch cannot be read",
                extra={"fields": {"patch": patch, "target": f"{fn.module}.{fn.qualname}",
                                  "error": str(exc)}},
            )
        if changed:
            drifted = True
            logger.warning(
                "upstream vLLM code under a compat patch changed; review the patch",
                extra={"fields": {"patch": patch, "target": f"{fn.module}.{fn.qualname}"}},
            )
    return drifted


def installed_vllm_version() -> str:
    from vllm.version import __version__

    return str(__version__)


def warn_if_unsupported_vllm() -> bool:
    """Log a warning unless the installed vLLM is a 0.32.x release. Returns True if supported."""
    version = installed_vllm_version()
    if version.startswith(SUPPORTED_SERIES):
        return True
    logger.warning(
        "specserve's compat patches target vLLM 0.32.x",
        extra={"fields": {"installed": version, "supported": f"{SUPPORTED_SERIES}x"}},
    )
    return False

