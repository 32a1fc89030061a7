"""The engine refuses, with a 400, every constraint it could not serve.

vLLM 0.32 validates a structured-output request in its front end
(``backend_xgrammar.validate_xgrammar_grammar``: converts the schema, regex or grammar) and
compiles it later, in the engine core. A constraint that converts but does not compile
(``{"type": "string", "pattern": "[a-z]{1,200}"}`` stops xgrammar 0.2.8's compiler on an internal
check) or that admits no output at all (``{"$ref": "#"}``) passed the validation and failed the
request in the core: a 500, or a stream cut by an error event.

The patch wraps the validation: after vLLM's own checks, the grammar the engine will serve is
compiled (:func:`specserve.structured.served.compile_served`, small stand-in vocabulary) in a
worker process, within ``$SPECSERVE_ENGINE_COMPILE_TIMEOUT_S`` (default 6 s, twice the gateway's
limit); a failure, an empty language or a compile over time raises vLLM's validation error, which
its server answers with 400. Answers are cached by content (1,024). Until the workers have
started (a second or two after the first constrained request), the compile runs in the calling
thread without a time limit, and its answer is cached too.

The check runs in the API server's event loop (vLLM validates synchronously there), so a request
the gateway already compiled, under the same reading (:mod:`specserve_vllm.engine_auth`'s
``checked_reading``), is not compiled again: only direct callers of the engine pay for it.

Relied on: ``SamplingParams._validate_structured_outputs`` imports the function from its module
when called, so replacing the module attribute reaches every caller.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

from specserve_vllm.compat.upstream import UpstreamFunction, warn_if_drifted

logger = logging.getLogger(__name__)

MODULE = "vllm.v1.structured_output.backend_xgrammar"

REPLACED = UpstreamFunction(
    MODULE,
    "validate_xgrammar_grammar",
    "659d831616dce502857a2844427d3d2ad0325bbf4de420e19c52a5c8b8eda031",
)
CALLER = UpstreamFunction(
    "vllm.sampling_params",
    "SamplingParams._validate_structured_outputs",
    "7a918e8ce7c5f661d0741cdcf142e164d93f90d9faa12e47d41f103efc9031ea",
)
UPSTREAM = (REPLACED, CALLER)

TIMEOUT_ENV = "SPECSERVE_ENGINE_COMPILE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6.0

_CHECKER: dict[str, Any] = {}


def _checker() -> Any:
    from specserve.structured.compile import GrammarChecker

    if "checker" not in _CHECKER:
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
        except ValueError:
            timeout = DEFAULT_TIMEOUT_S
        _CHECKER["checker"] = GrammarChecker(cache_size=1024, timeout_s=timeout)
    return _CHECKER["checker"]


def constraint_of(params: Any) -> tuple[str, Any] | None:
    """``(kind, spec)`` of a request's json / regex / grammar constraint (``None``: none of them).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> constraint_of(NS(structured_outputs=NS(json=None, regex="[0-9]+", grammar=None)))
        ('regex', '[0-9]+')
    """
    so = getattr(params, "structured_outputs", None)
    if so is None:
        return None
    for kind in ("json", "regex", "grammar"):
        spec = getattr(so, kind, None)
        if spec:
            return kind, spec
    return None


def check_served(params: Any) -> None:
    """Raise ``ValueError`` (vLLM's validation error) when the request's constraint cannot be
    served: it does not compile, admits no output, or compiles too slowly."""
    from specserve.structured.compile import CompileBusy, CompileRefused
    from specserve.structured.served import NotServable, compile_served

    found = constraint_of(params)
    if found is None or _checked_by_gateway():
        return
    kind, spec = found
    try:
        _checker().check(kind, spec, owner="engine")
    except CompileRefused as err:
        raise _validation_error(f"The {kind} constraint cannot be served: {err}") from err
    except CompileBusy:
        try:  # workers still starting (or all busy): compile here, unbounded
            compile_served(kind, spec)  # type: ignore[arg-type]
        except NotServable as err:
            _checker().remember(kind, spec, str(err))  # the same request again is not compiled again
            raise _validation_error(f"The {kind} constraint cannot be served: {err}") from err
        _checker().remember(kind, spec, None)


def _checked_by_gateway() -> bool:
    """Whether the keyed caller compiled this request's constraints under this engine's reading."""
    from specserve.structured.engine_grammar import served_reading
    from specserve_vllm.engine_auth import checked_reading

    said = checked_reading()
    return said is not None and said == served_reading()


def _validation_error(message: str) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message)  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - older layouts: the server maps ValueError to 400
        return ValueError(message)


def _wrap(original: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(original)
    def validate_xgrammar_grammar(sampling_params: Any) -> None:
        original(sampling_params)
        check_served(sampling_params)

    validate_xgrammar_grammar.__specserve_served_check__ = True  # type: ignore[attr-defined]
    return validate_xgrammar_grammar


def apply() -> None:
    """Wrap ``validate_xgrammar_grammar`` with the served-grammar check (idempotent)."""
    module = importlib.import_module(MODULE)
    current = module.validate_xgrammar_grammar
    if getattr(current, "__specserve_served_check__", False):
        return
    warn_if_drifted(__name__, UPSTREAM)
    module.validate_xgrammar_grammar = _wrap(current)
    logger.debug("installed the served-grammar check in vLLM's structured-output validation")
