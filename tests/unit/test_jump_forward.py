"""Jump-forward drafting: idempotence, and the extension on a real xgrammar grammar
over a toy vocabulary (no model)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from specserve.engine import settings
from specserve_vllm.compat import jump_forward

VOCAB = ["<eos>", "{", "}", '"', "a", "b", ":", "x", "y", "c", "ab"]
EOS, A, B, COLON, X, Y, C, AB = 0, 4, 5, 6, 7, 8, 9, 10
# After "ab" (one token or two) the grammar forks on x|y, then forces "c", ":", then EOS.
GRAMMAR = 'root ::= "ab" ("x" | "y") "c:"'


def test_apply_is_idempotent() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    jump_forward.apply()
    first = (StructuredOutputManager.validate_tokens, Scheduler.update_draft_token_ids)
    jump_forward.apply()
    assert (StructuredOutputManager.validate_tokens, Scheduler.update_draft_token_ids) == first
    for fn in first:
        # other patches (grammar-pruned trees) may wrap the same method; jump-forward's wrapper
        # appears exactly once in the chain
        layers = []
        while fn is not None:
            layers.append(fn)
            fn = getattr(fn, "__wrapped__", None)
        ours = [f for f in layers if f.__code__.co_filename == jump_forward.__file__]
        assert len(ours) == 1, "wrapped exactly once"


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
    with settings.override(jump_forward=False):
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


def test_a_repeated_error_is_warned_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jump_forward, "_WARNED", set())
    validate = jump_forward._wrap_validate(lambda self, request, tokens: list(tokens))
    broken = SimpleNamespace(vllm_config=None)  # extension raises AttributeError
    update = jump_forward._wrap_update(lambda self, d: d.append(validate(broken, _request(object()), [3])))
    with caplog.at_level("DEBUG", logger=jump_forward.__name__):
        for _ in range(3):
            update(None, [])
    levels = [r.levelname for r in caplog.records if r.getMessage() == "jump-forward drafting skipped"]
    assert levels == ["WARNING", "DEBUG", "DEBUG"]


def test_a_request_without_structured_output_is_not_extended(caplog: pytest.LogCaptureFixture) -> None:
    """The per-step path of ordinary requests: upstream's drafts as they are, without touching
    the manager (which here would raise)."""
    validate = jump_forward._wrap_validate(lambda self, request, tokens: list(tokens))
    broken = SimpleNamespace(vllm_config=None)
    out: list[list[int]] = []
    update = jump_forward._wrap_update(lambda self, d: d.append(validate(broken, _request(None), [3, 4])))
    with caplog.at_level("DEBUG", logger=jump_forward.__name__):
        update(None, out)
    assert out == [[3, 4]] and not caplog.records


# The same grammar over a vocabulary that also has "c:": after "abx" the grammar allows "c" and
# "c:", so no single token is forced, but the string "c:" is.
VOCAB_WITH_PAIR = [*VOCAB, "c:"]
C_COLON = len(VOCAB)


def _longest_match_tokenizer(vocab: list[str]) -> Any:
    """``encode`` by greedy longest match: the stand-in for the engine's tokenizer."""

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        ids: list[int] = []
        while text:
            piece = max((v for v in vocab[1:] if text.startswith(v)), key=len)
            ids.append(vocab.index(piece))
            text = text[len(piece):]
        return ids

    return SimpleNamespace(encode=encode)


def _pair_grammar() -> Any:
    import xgrammar as xgr
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    info = xgr.TokenizerInfo(VOCAB_WITH_PAIR, vocab_type=xgr.VocabType.RAW, stop_token_ids=[EOS])
    ctx = xgr.GrammarCompiler(info).compile_grammar(GRAMMAR)
    matcher = xgr.GrammarMatcher(ctx, max_rollback_tokens=4)
    return XgrammarGrammar(vocab_size=len(VOCAB_WITH_PAIR), matcher=matcher, ctx=ctx)


def _pair_manager(tokenizer: Any, num_spec: int = 4) -> Any:
    import xgrammar as xgr

    manager = _manager(num_spec)
    manager.backend.vocab_size = len(VOCAB_WITH_PAIR)
    manager.backend.allocate_token_bitmask = lambda n: xgr.allocate_token_bitmask(n, len(VOCAB_WITH_PAIR))
    manager.tokenizer = tokenizer
    return manager


def test_a_forced_string_is_drafted_as_the_tokenizer_spells_it() -> None:
    grammar = _pair_grammar()
    grammar.accept_tokens("r0", [AB])
    before = _state(grammar)
    # Longest match spells "c:" as one token; then EOS is the only token allowed.
    manager = _pair_manager(_longest_match_tokenizer(VOCAB_WITH_PAIR))
    assert jump_forward.extend_drafts(manager, _request(grammar), [X]) == [X, C_COLON, EOS]
    assert _state(grammar) == before
    # Another spelling is drafted as given: the target decides which one it accepts.
    chars = _pair_manager(_longest_match_tokenizer([v for v in VOCAB_WITH_PAIR if v != "c:"]))
    assert jump_forward.extend_drafts(chars, _request(grammar), [X]) == [X, C, COLON, EOS]
    # The cap counts the string's tokens too.
    assert jump_forward.extend_drafts(_pair_manager(chars.tokenizer, 2), _request(grammar), [X]) == [X, C]
    assert _state(grammar) == before


def test_forced_strings_need_a_tokenizer_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    grammar = _pair_grammar()
    grammar.accept_tokens("r0", [AB])
    before = _state(grammar)
    assert jump_forward.extend_drafts(_pair_manager(None), _request(grammar), [X]) == [X]
    manager = _pair_manager(_longest_match_tokenizer(VOCAB_WITH_PAIR))
    with settings.override(jump_forward_strings=False):
        assert jump_forward.extend_drafts(manager, _request(grammar), [X]) == [X]
    # A tokenizer that spells the string with a token the grammar rejects: nothing is drafted.
    wrong = _pair_manager(SimpleNamespace(encode=lambda text, add_special_tokens=True: [Y, C]))
    assert jump_forward.extend_drafts(wrong, _request(grammar), [X]) == [X]
    assert _state(grammar) == before


def test_the_manager_still_keeps_the_tokenizer_forced_strings_use() -> None:
    # Forced strings are tokenized with StructuredOutputManager.tokenizer (read with getattr, so
    # a rename would silently turn them off): fail here instead.
    import inspect

    from vllm.v1.structured_output import StructuredOutputManager

    assert "self.tokenizer = " in inspect.getsource(StructuredOutputManager.__init__)
