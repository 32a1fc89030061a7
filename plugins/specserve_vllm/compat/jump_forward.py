"""Jump-forward drafting: grammar-forced tokens become draft tokens.

A grammar-constrained request (structured outputs: ``json``, ``json_object``, ``regex``,
``choice``, ...) often reaches states where the grammar allows exactly one token: a required key,
the ``":"`` after it, the closing quote of an enum value. The target model can only emit that
token there, so proposing it as a draft costs one verification slot and is always accepted.

The seam is ``StructuredOutputManager.validate_tokens``, which ``Scheduler.update_draft_token_ids``
calls on each request's drafts and which returns the grammar-valid prefix. The wrapper then
appends grammar-forced tokens: it advances the request's grammar over that prefix, and while the
grammar allows exactly one token (counted on a filled bitmask, :func:`sole_allowed_token`) and the
draft is shorter than its cap, appends that token and advances. Where several tokens are allowed
but the grammar still forces a string (``"name": "`` after a required key's ``{``: BPE
vocabularies spell it many ways), the string is tokenized with the engine's tokenizer and its
grammar-valid tokens are drafted (``SPECSERVE_JUMP_FORWARD_STRINGS=0`` turns just this off).
Finally it rolls the grammar back so it ends in exactly the state it started in. The cap is the engine's ``num_speculative_tokens``
and the request's own ``spec_k`` (:func:`draft_cap`; ``spec_k = 0`` keeps the request draft-free).

Only the synchronous scheduling path extends drafts (a wrapper around
``Scheduler.update_draft_token_ids`` marks it). In async scheduling,
``Scheduler.update_draft_token_ids_in_output`` validates drafts against placeholder slots that
were scheduled already, and pads the rest with ``-1``; there the drafts are left as vLLM made
them. Requests without a grammar, with a grammar still compiling, failed or terminated, and
requests still reasoning before their constraint starts are left unchanged too; an unexpected
error in the extension is logged and the unextended drafts are used.

Switches: the engine settings ``jump_forward`` and ``jump_forward_strings``
(:mod:`specserve.engine.settings`: ``SPECSERVE_JUMP_FORWARD[_STRINGS]``, ``specserve serve
--no-jump-forward[-strings]``), read at plugin registration.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from specserve.engine import settings
from specserve_vllm.compat.upstream import UpstreamFunction
from specserve_vllm.spec_k import safe_spec_k

logger = logging.getLogger(__name__)

_MARK = "_specserve_jump_forward"
_SCRATCH = "_specserve_jump_forward_bitmask"
_ENCODED = "_specserve_jump_forward_encoded"

_WARNED: set[str] = set()
"""Kinds of extension errors already logged at warning level (later ones go to debug)."""

_SYNC_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "specserve_jump_forward_sync_path", default=False
)

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: returns the grammar-valid prefix of the drafts.
    UpstreamFunction("vllm.v1.structured_output", "StructuredOutputManager.validate_tokens",
                     "afead6e9119093aaabf4c171bf6cf4f976817f07a2827ac0248747d05b1bd59f"),
    # Relied on: grammar_start == 0 for an empty draft means "constrained from here".
    UpstreamFunction("vllm.v1.structured_output", "StructuredOutputManager._get_constraint_bounds",
                     "f952489bf3371e7910a848eb6c285801584c7ac27ef16bd246369c4503684eb6"),
    # Relied on: one bitmask row per draft position, (1 + num_speculative_tokens) per request.
    UpstreamFunction("vllm.v1.structured_output", "StructuredOutputManager.grammar_bitmask",
                     "67b3e0e65ccde211b6155cf3a569e5b62712e0c63a16f4bfcddc0083db72c1c7"),
    # Wrapped (marks the sync path): drafts become request.spec_token_ids as returned.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_draft_token_ids",
                     "d6dc1e96fb96d1d3b62ff7780f7e23ed6e00d2a5468f454434f69bfa66048b3c"),
    # Relied on: the async path pads to placeholders, so it must not be extended.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_draft_token_ids_in_output",
                     "ef7eee38ed3919d14f0bebe6240333ea590244036000d788e85b5e81ad68bf31"),
    # Relied on: matcher created with max_rollback_tokens = num_speculative_tokens.
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarBackend.compile_grammar",
                     "b1ebb9c0c209160857f2d3282d6caccb463828670cdb771ad937d0cd7e347ee6"),
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar.accept_tokens",
                     "bcc62b08640423a6d578699014a6b4bbf20e66c7873daa49f309d020743a3a78"),
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar.rollback",
                     "5297b5adc4628598cc3c7e65dea8f4e1bcbb7c33dc01ba77b9b8b61321570538"),
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar.fill_bitmask",
                     "a235f340d78767da65eff577f272e91135a5a85fd774f4cf4b09bd085814a392"),
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar.is_terminated",
                     "dcc56a6ae81438bee890414e97e0867af00522cf3d0d376aa910ae0dafb231ac"),
    # Relied on: returns the accepted prefix and restores the matcher, without logging.
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar.validate_tokens",
                     "6dd9de1a3370995c0237fffb797f58d6a11811ecbab92e242ac75fa2b6cc4de0"),
)


def enabled() -> bool:
    """Whether jump-forward drafting is on (the engine setting)."""
    return settings.current().jump_forward


def strings_enabled() -> bool:
    """Whether forced *strings* are drafted too (not just single forced tokens)."""
    return settings.current().jump_forward_strings


def sole_allowed_token(row: npt.NDArray[np.int32], vocab_size: int) -> int | None:
    """The only token a bitmask row allows, or ``None`` when it allows none or several.

    Token ``t`` is bit ``t % 32`` of 32-bit word ``t // 32`` (xgrammar's layout); bits at or past
    ``vocab_size`` are ignored.

    >>> sole_allowed_token(np.array([0, 1 << 3], dtype=np.int32), 64)
    35
    >>> sole_allowed_token(np.array([0b101, 0], dtype=np.int32), 64) is None
    True
    >>> sole_allowed_token(np.array([0, 0], dtype=np.int32), 64) is None
    True
    >>> sole_allowed_token(np.array([1, -1], dtype=np.int32), 32)  # bits >= 32: padding
    0
    """
    words = np.ascontiguousarray(row, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size]
    allowed = np.flatnonzero(bits)
    return int(allowed[0]) if allowed.size == 1 else None


def draft_cap(num_speculative_tokens: int, spec_k: int | None) -> int:
    """Most draft tokens a request may carry: the engine's length, lowered by its ``spec_k``.

    >>> draft_cap(4, None), draft_cap(4, 2), draft_cap(4, 9), draft_cap(4, 0)
    (4, 2, 4, 0)
    """
    return num_speculative_tokens if spec_k is None else min(num_speculative_tokens, spec_k)


def _advance(grammar: Any, request_id: str, token: int) -> bool:
    """Accept one token; True only if the grammar state really moved."""
    if grammar.is_terminated():
        return False
    return bool(grammar.accept_tokens(request_id, [token]))


def forced_tokens(
    grammar: Any,
    request_id: str,
    prefix: Sequence[int],
    cap: int,
    scratch: Any,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None = None,
) -> list[int]:
    """Tokens the grammar forces after ``prefix``, so that ``len(prefix) + len(result) <= cap``.

    First every position where the grammar allows a single token. Where it allows several tokens
    but only one *string* (a key and its ``": "`` can be spelled by many token sequences), that
    string (xgrammar's jump-forward string) is tokenized with ``encode`` — the way the model most
    likely writes it — and its grammar-valid prefix is drafted. The target model verifies every
    draft, so a tokenization it would not choose costs a rejected draft, never an output change.

    ``scratch`` is a one-row bitmask tensor. The grammar is rolled back to its entry state.
    """
    advanced = 0
    forced: list[int] = []
    try:
        for token in prefix:
            if not _advance(grammar, request_id, token):
                return []
            advanced += 1
        while len(prefix) + len(forced) < cap and not grammar.is_terminated():
            grammar.fill_bitmask(scratch, 0)
            token = sole_allowed_token(scratch[0].numpy(), vocab_size)
            if token is not None:
                if not _advance(grammar, request_id, token):
                    break
                advanced += 1
                forced.append(token)
                continue
            text = grammar.matcher.find_jump_forward_string() if encode is not None else ""
            if not text:
                break
            ids = encode(text)[: cap - len(prefix) - len(forced)]
            moved = 0
            for token in grammar.validate_tokens(ids):  # the valid prefix; no error log on a mismatch
                if not _advance(grammar, request_id, token):
                    break
                advanced += 1
                moved += 1
                forced.append(token)
            if moved == 0 or moved < len(ids):
                break  # spelled otherwise than the grammar allows: stop where it diverged
    finally:
        if advanced:
            grammar.rollback(advanced)
    return forced


_ENCODED_MAX = 4096


def encoder(manager: Any) -> Callable[[str], list[int]] | None:
    """``text -> token ids`` with the engine's tokenizer (no special tokens), memoized per manager.

    Forced strings repeat (a schema's keys, ``": "``), so a bounded dict saves most encodes.
    """
    tokenizer = getattr(manager, "tokenizer", None)
    if tokenizer is None:
        return None
    cache: dict[str, list[int]] | None = getattr(manager, _ENCODED, None)
    if cache is None:
        cache = {}
        setattr(manager, _ENCODED, cache)

    def encode(text: str) -> list[int]:
        ids = cache.get(text)
        if ids is None:
            if len(cache) >= _ENCODED_MAX:
                cache.clear()
            ids = cache[text] = list(tokenizer.encode(text, add_special_tokens=False))
        return ids

    return encode


def scratch_bitmask(manager: Any) -> Any:
    """A one-row bitmask kept on the manager for probing the grammar's next tokens."""
    scratch = getattr(manager, _SCRATCH, None)
    if scratch is None:
        scratch = manager.backend.allocate_token_bitmask(1)
        setattr(manager, _SCRATCH, scratch)
    return scratch


def ready_grammar(manager: Any, request: Any) -> Any | None:
    """The request's compiled, live grammar if its drafts are constrained from the first token."""
    from vllm.v1.structured_output.backend_types import StructuredOutputGrammar

    structured = getattr(request, "structured_output_request", None)
    if not request.use_structured_output or structured is None or manager.backend is None:
        return None
    grammar = structured.grammar  # None while compiling, an Exception if compilation failed
    if not isinstance(grammar, StructuredOutputGrammar) or grammar.is_terminated():
        return None
    if manager._get_constraint_bounds(request, ()).grammar_start != 0:
        return None  # still reasoning: the grammar has not started
    return grammar


def request_cap(manager: Any, request: Any) -> int:
    """:func:`draft_cap` for ``request``: the engine's draft slots, lowered by its ``spec_k``."""
    params = getattr(request, "sampling_params", None)
    return draft_cap(int(manager.vllm_config.num_speculative_tokens),
                     safe_spec_k(getattr(params, "extra_args", None)))


def extend_drafts(manager: Any, request: Any, valid: list[int]) -> list[int]:
    """``valid`` (the grammar-valid drafts) followed by the tokens the grammar forces next."""
    cap = request_cap(manager, request)
    if len(valid) >= cap:
        return valid[:cap]
    grammar = ready_grammar(manager, request)
    if grammar is None:
        return valid
    vocab_size = int(manager.backend.vocab_size)
    forced = forced_tokens(
        grammar, request.request_id, valid, cap, scratch_bitmask(manager), vocab_size,
        encoder(manager) if strings_enabled() else None,
    )
    return valid + forced if forced else valid


def _wrap_validate(original: Callable[..., list[int]]) -> Callable[..., list[int]]:
    @functools.wraps(original)
    def validate_tokens(self: Any, request: Any, spec_tokens: list[int]) -> list[int]:
        valid = original(self, request, spec_tokens)
        if not request.use_structured_output or not _SYNC_PATH.get() or not enabled():
            return valid
        try:
            return extend_drafts(self, request, list(valid))
        except Exception as exc:  # never let drafting take the engine down
            # A systematic failure would repeat on every step: warn once per kind of error.
            kind = type(exc).__name__
            level = logging.DEBUG if kind in _WARNED else logging.WARNING
            _WARNED.add(kind)
            logger.log(
                level,
                "jump-forward drafting skipped",
                extra={"fields": {"request_id": getattr(request, "request_id", None),
                                  "error": repr(exc)}},
            )
            return valid

    setattr(validate_tokens, _MARK, True)
    return validate_tokens


def _wrap_update(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def update_draft_token_ids(self: Any, draft_token_ids: Any) -> None:
        token = _SYNC_PATH.set(True)
        try:
            original(self, draft_token_ids)
        finally:
            _SYNC_PATH.reset(token)

    setattr(update_draft_token_ids, _MARK, True)
    return update_draft_token_ids


def apply() -> None:
    """Install jump-forward drafting (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    if getattr(StructuredOutputManager.validate_tokens, _MARK, False):
        return
    StructuredOutputManager.validate_tokens = _wrap_validate(  # type: ignore[method-assign]
        StructuredOutputManager.validate_tokens
    )
    Scheduler.update_draft_token_ids = _wrap_update(  # type: ignore[method-assign]
        Scheduler.update_draft_token_ids
    )
    logger.debug("installed jump-forward drafting for structured outputs")
