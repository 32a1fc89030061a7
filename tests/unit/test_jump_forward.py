"""Jump-forward drafting: upstream drift, idempotence, and the extension on a real xgrammar grammar
over a toy vocabulary (no model)."""

from __future__ import annotations

import doctest
from types import SimpleNamespace
from typing import Any

import pytest

from specserve_vllm.compat import jump_forward

VOCAB = ["<eos>", "{", "}", '"', "a", "b", ":", "x", "y", "c", "ab"]
EOS, A, B, COLON, X, Y, C, AB = 0, 4, 5, 6, 7, 8, 9, 10
# After "ab" (one token or two) the grammar forks on x|y, then forces "c", ":", then EOS.
GRAMMAR = 'root ::= "ab" ("x" | "y") "c:"'


def test_upstream_code_under_the_patch_is_unchanged() -> None:
    # A mismatch means vLLM changed draft validation, the scheduler's draft hand-off or the
    # xgrammar grammar wrapper: re-read them, adapt jump_forward.py, then update UPSTREAM_SHA256.
    assert jump_forward.upstream_digests() == jump_forward.UPSTREAM_SHA256


def test_doctests() -> None:
    assert doctest.testmod(jump_forward).failed == 0


def test_apply_is_idempotent() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    jump_forward.apply()
    first = (StructuredOutputManager.validate_tokens, Scheduler.update_draft_token_ids)
    jump_forward.apply()
    assert (StructuredOutputManager.validate_tokens, Scheduler.update_draft_token_ids) == first
    for fn in first:
        assert not hasattr(fn.__wrapped__, "__wrapped__"), "wrapped exactly once"


def _grammar(max_rollback: int = 4) -> Any:
    import xgrammar as xgr
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[EOS])
    ctx = xgr.GrammarCompiler(info).compile_grammar(GRAMMAR)
    matcher = xgr.GrammarMatcher(ctx, max_rollback_tokens=max_rollback)
    return XgrammarGrammar(vocab_size=len(VOCAB), matcher=matcher, ctx=ctx)


def _manager(num_spec: int = 4) -> Any:
    import xgrammar as xgr
    from vllm.v1.structured_output import ConstraintBounds

    backend = SimpleNamespace(
        vocab_size=len(VOCAB),
        allocate_token_bitmask=lambda n: xgr.allocate_token_bitmask(n, len(VOCAB)),
    )
    return SimpleNamespace(
        vllm_config=SimpleNamespace(num_speculative_tokens=num_spec),
        backend=backend,
        _get_constraint_bounds=lambda request, tokens: ConstraintBounds(0, 0),
    )


def _request(grammar: Any, extra_args: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(
        request_id="r0",
        use_structured_output=grammar is not None,
        structured_output_request=SimpleNamespace(grammar=grammar) if grammar is not None else None,
        sampling_params=SimpleNamespace(extra_args=extra_args),
    )


def _state(grammar: Any) -> tuple[Any, ...]:
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(1, len(VOCAB))
    grammar.fill_bitmask(mask, 0)
    return grammar.num_processed_tokens, grammar.is_terminated(), mask.tolist()


def test_forced_tokens_follow_the_valid_prefix_and_the_grammar_is_restored() -> None:
    grammar = _grammar()
    grammar.accept_tokens("r0", [AB])
    before = _state(grammar)
    manager = _manager()
    assert jump_forward.extend_drafts(manager, _request(grammar), [X]) == [X, C, COLON, EOS]
    assert _state(grammar) == before
    # At a fork nothing is forced.
    assert jump_forward.extend_drafts(manager, _request(grammar), []) == []
    assert _state(grammar) == before


def test_caps_engine_length_and_spec_k() -> None:
    grammar = _grammar()
    grammar.accept_tokens("r0", [AB, Y])
    assert jump_forward.extend_drafts(_manager(2), _request(grammar), []) == [C, COLON]
    assert jump_forward.extend_drafts(_manager(), _request(grammar, {"spec_k": 1}), []) == [C]
    assert jump_forward.extend_drafts(_manager(), _request(grammar, {"spec_k": 0}), []) == []
    assert jump_forward.extend_drafts(_manager(), _request(grammar, {"spec_k": 0}), [C]) == []
    assert grammar.num_processed_tokens == 2


def test_terminated_missing_and_uncompiled_grammars_are_left_alone() -> None:
    manager = _manager()
    grammar = _grammar()
    grammar.accept_tokens("r0", [AB, X, C, COLON, EOS])
    assert grammar.is_terminated()
    assert jump_forward.extend_drafts(manager, _request(grammar), []) == []
    assert jump_forward.extend_drafts(manager, _request(None), [5, 6]) == [5, 6]
    compiling = _request(grammar)
    compiling.structured_output_request.grammar = None  # a Future not done reads as None
    assert jump_forward.extend_drafts(manager, compiling, []) == []
    failed = _request(grammar)
    failed.structured_output_request.grammar = RuntimeError("compile failed")
    assert jump_forward.extend_drafts(manager, failed, [1]) == [1]


def test_still_reasoning_is_left_alone() -> None:
    from vllm.v1.structured_output import ConstraintBounds

    grammar = _grammar()
    grammar.accept_tokens("r0", [AB, Y])
    manager = _manager()
    manager._get_constraint_bounds = lambda request, tokens: ConstraintBounds(1, 1)
    assert jump_forward.extend_drafts(manager, _request(grammar), []) == []


def test_only_the_sync_path_extends_and_the_switch_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grammar = _grammar()
    grammar.accept_tokens("r0", [AB, Y])
    validate = jump_forward._wrap_validate(lambda self, request, tokens: list(tokens))
    manager, request = _manager(), _request(grammar)
    seen: list[list[int]] = []

    def scheduler_update(self: Any, drafts: list[int]) -> None:
        seen.append(validate(manager, request, drafts))

    update = jump_forward._wrap_update(scheduler_update)
    assert validate(manager, request, []) == []  # async path / outside the scheduler
    update(None, [])
    assert seen[-1] == [C, COLON, EOS]
    monkeypatch.setenv(jump_forward.ENV_SWITCH, "0")
    update(None, [])
    assert seen[-1] == []
    monkeypatch.delenv(jump_forward.ENV_SWITCH)
    monkeypatch.setattr(jump_forward, "ENABLED", False)
    update(None, [])
    assert seen[-1] == []
    assert not jump_forward._SYNC_PATH.get()


def test_errors_fall_back_to_the_valid_drafts() -> None:
    validate = jump_forward._wrap_validate(lambda self, request, tokens: list(tokens))
    broken = SimpleNamespace(vllm_config=None)  # extension raises AttributeError
    update = jump_forward._wrap_update(lambda self, d: d.append(validate(broken, _request(None), [3])))
    out: list[Any] = []
    update(None, out)
    assert out == [[3]]
