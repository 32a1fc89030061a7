"""The engine-core side of grammar-pruned trees (``compat/tree_grammar``), around a real
xgrammar matcher: which drafts a structured-output request keeps, which trees a step schedules,
and where their mask rows land in the step's bitmask. The real engine's equality and sampling
tests are in ``tests/integration/test_trees_engine.py``."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest
import xgrammar

from specserve.engine import settings
from specserve_vllm.compat import tree_grammar
from specserve_vllm.compat.tree_steps import TREES_ATTR, tree_of
from specserve_vllm.tree.draft import DraftTree

VOCAB = ["a", "b", "c", "d", "{", "}", '"', ":", "1", "</s>"]
A, B, C, D = 0, 1, 2, 3
STOP = VOCAB.index("</s>")
WORDS = 1  # 10 tokens fit one int32 word


class _Manager:
    """The parts of vLLM's ``StructuredOutputManager`` the wraps read."""

    def __init__(self, num_speculative_tokens: int = 8) -> None:
        self.backend = NS(vocab_size=len(VOCAB), allocate_token_bitmask=lambda n: xgrammar.allocate_token_bitmask(n, len(VOCAB)))
        self.vllm_config = NS(num_speculative_tokens=num_speculative_tokens)
        self.calls: list[list[int]] = []

    def _get_constraint_bounds(self, request: Any, tokens: Any) -> Any:
        return NS(grammar_start=0, constraint_start=0)


def _upstream(manager: _Manager, request: Any, spec_tokens: list[int]) -> list[int]:
    manager.calls.append(list(spec_tokens))
    return list(spec_tokens)


def _request(regex: str, spec_k: int | None = None) -> Any:
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    info = xgrammar.TokenizerInfo(VOCAB, stop_token_ids=[STOP])
    compiled = xgrammar.GrammarCompiler(info).compile_regex(regex)
    grammar = XgrammarGrammar(vocab_size=len(VOCAB), matcher=xgrammar.GrammarMatcher(compiled), ctx=compiled)
    params = NS(extra_args=None if spec_k is None else {"spec_k": spec_k})
    return NS(request_id="r1", use_structured_output=True, structured_output_request=NS(grammar=grammar),
              sampling_params=params)


@pytest.fixture()
def request_() -> Any:
    return _request(r"a(b|c)+d")


def _drafted(manager: _Manager, tree: DraftTree) -> None:
    setattr(manager, tree_grammar._DRAFTED, {"r1": tree})


def _allowed(row: np.ndarray) -> set[int]:
    word = int(row[0]) & 0xFFFFFFFF
    return {t for t in range(len(VOCAB)) if (word >> t) & 1}


def test_a_branching_tree_is_pruned_and_kept_with_its_rows(request_: Any) -> None:
    manager = _Manager()
    # a -> {b -> d, c -> d}, and b at the root, which the grammar (a(b|c)+d) rejects
    tree = DraftTree(tokens=(A, B, D, C, D, B), parents=(-1, 0, 1, 0, 3, -1))
    _drafted(manager, tree)
    with settings.override(jump_forward=False):  # else the forced stop token grows both leaves
        kept = tree_grammar.validate(manager, _upstream, request_, list(tree.tokens))
    assert kept == [A, B, D, C, D]
    assert manager.calls == []  # a branching tree bypasses the chain check
    pruned, rows = getattr(manager, tree_grammar._PENDING)["r1"]
    assert pruned == DraftTree(tokens=(A, B, D, C, D), parents=(-1, 0, 1, 0, 3))
    assert rows.shape == (6, WORDS)
    assert _allowed(rows[0]) == {A}  # before any draft
    assert _allowed(rows[1]) == {B, C}  # after "a"
    assert _allowed(rows[2]) == {B, C, D}  # after "ab"
    assert _allowed(rows[4]) == {B, C, D}  # after "ac"
    assert request_.structured_output_request.grammar.matcher.accept_token(A), "the walk moved the matcher"


@pytest.mark.parametrize(("cap", "spec_k", "grown"), [
    # a -> {b, c}; "a(b|c)dd" forces "dd" and the stop token after either: the best leaf first
    (8, None, DraftTree(tokens=(A, B, D, D, STOP, C, D, D), parents=(-1, 0, 1, 2, 3, 0, 5, 6))),
    (5, None, DraftTree(tokens=(A, B, D, D, C), parents=(-1, 0, 1, 2, 0))),
    (8, 4, DraftTree(tokens=(A, B, D, C), parents=(-1, 0, 1, 0))),  # the request's spec_k caps nodes
])
def test_grammar_forced_tokens_extend_the_surviving_leaves(cap: int, spec_k: int | None, grown: DraftTree) -> None:
    manager, request = _Manager(num_speculative_tokens=cap), _request(r"a(b|c)dd", spec_k)
    tree = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0))
    _drafted(manager, tree)
    with settings.override(jump_forward_strings=False):
        kept = tree_grammar.validate(manager, _upstream, request, list(tree.tokens))
    assert kept == list(grown.tokens)
    pruned, rows = getattr(manager, tree_grammar._PENDING)["r1"]
    assert pruned == grown and rows.shape == (len(grown) + 1, WORDS)
    assert _allowed(rows[2]) == {D}  # after "ab"
    with settings.override(jump_forward=False):
        _drafted(manager, tree)
        assert tree_grammar.validate(manager, _upstream, request, list(tree.tokens)) == [A, B, C]


def test_a_tree_pruned_to_a_chain_takes_the_chain_path(request_: Any) -> None:
    manager = _Manager()
    tree = DraftTree(tokens=(A, B, D, D, C), parents=(-1, 0, 1, 0, -1))  # "ad" and root "c" are rejected
    _drafted(manager, tree)
    assert tree_grammar.validate(manager, _upstream, request_, list(tree.tokens)) == [A, B, D]
    assert manager.calls == [[A, B, D]]  # upstream's check (and jump-forward) see the chain
    assert getattr(manager, tree_grammar._PENDING) == {}


def test_drafts_that_are_not_the_trees_prefix_stay_chains(request_: Any) -> None:
    manager = _Manager()
    tree = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0))
    _drafted(manager, tree)
    assert tree_grammar.validate(manager, _upstream, request_, [A, C]) == [A, C]  # capped differently
    assert manager.calls == [[A, C]] and getattr(manager, tree_grammar._PENDING) == {}
    # no tree drafted for the request: upstream only
    assert tree_grammar.validate(manager, _upstream, request_, [A, B]) == [A, B]
    assert manager.calls[-1] == [A, B]


def test_a_failing_walk_leaves_the_drafts_to_the_chain_path(request_: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from specserve_vllm.tree import grammar

    def broken(*args: Any) -> Any:
        raise RuntimeError("walk failed")

    monkeypatch.setattr(grammar, "grammar_prune", broken)
    manager = _Manager()
    tree = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0))
    _drafted(manager, tree)
    assert tree_grammar.validate(manager, _upstream, request_, [A, B, C]) == [A, B, C]
    assert manager.calls == [[A, B, C]] and getattr(manager, tree_grammar._PENDING) == {}


def test_a_step_schedules_the_branching_prefixes_and_drops_what_ran() -> None:
    manager = _Manager()
    tree = DraftTree(tokens=(A, B, D, C, D), parents=(-1, 0, 1, 0, 3))
    rows = np.arange(6, dtype=np.int32).reshape(6, 1)
    setattr(manager, tree_grammar._PENDING, {"r1": (tree, rows), "r2": (tree, rows), "gone": (tree, rows),
                                             "waiting": (tree, rows)})
    out = NS(num_scheduled_tokens={"r1": 5, "r2": 4}, scheduled_spec_decode_tokens={"r1": [A, B, D, C], "r2": [A, B, D]})
    found = tree_grammar.step_trees(manager, {"r1": 0, "r2": 0, "waiting": 0}, out)
    assert list(found) == ["r1"]  # r2's 3 drafts are a chain
    assert found["r1"][0] == tree.prefix(4)
    # what ran is consumed, a request that finished is dropped, one not scheduled keeps its tree
    assert list(getattr(manager, tree_grammar._PENDING)) == ["waiting"]


def test_rows_land_at_each_requests_offset() -> None:
    bitmask = np.full((7, 1), -1, dtype=np.int32)
    tree = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0))
    rows = np.array([[1], [2], [3], [4]], dtype=np.int32)
    tree_grammar.overwrite_rows(bitmask, ["r0", "r1"], {"r0": [A, A], "r1": [A, B, C]}, {"r1": (tree, rows)})
    assert bitmask[:, 0].tolist() == [-1, -1, -1, 1, 2, 3, 4]  # r0: 1 + 2 rows untouched


def test_the_worker_sends_only_branching_trees_of_grammar_requests() -> None:
    branching = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0))
    runner = NS(requests={
        "json": NS(sampling_params=NS(structured_outputs=object())),
        "json-chain": NS(sampling_params=NS(structured_outputs=object())),
        "plain": NS(sampling_params=NS(structured_outputs=None)),
    })
    setattr(runner, TREES_ATTR, {"json": branching, "json-chain": DraftTree.chain((A, B)), "plain": branching,
                                 "finished": branching})
    assert tree_grammar.drafted_trees(runner) == {"json": branching}


def test_grammar_requests_verify_only_the_pruned_tree() -> None:
    drafted, pruned = DraftTree(tokens=(A, B, C), parents=(-1, 0, 0)), DraftTree(tokens=(A, B), parents=(-1, -1))
    plain = NS(temperature=0.0, min_p=0.0, logprobs=None, prompt_logprobs=None, presence_penalty=0.0,
               frequency_penalty=0.0, repetition_penalty=1.0, bad_words=None, logit_bias=None,
               allowed_token_ids=None, min_tokens=0, structured_outputs=None)
    grammar = NS(**{**vars(plain), "structured_outputs": object()})
    assert tree_of(plain, drafted, None) is drafted
    assert tree_of(grammar, drafted, pruned) is pruned
    assert tree_of(grammar, drafted, None) is None  # not pruned by the engine core: a chain
    assert tree_of(NS(**{**vars(grammar), "repetition_penalty": 1.2}), drafted, pruned) is None


def test_apply_is_idempotent() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    tree_grammar.apply()
    first = (StructuredOutputManager.validate_tokens, StructuredOutputManager.grammar_bitmask, Scheduler.schedule)
    tree_grammar.apply()
    assert (StructuredOutputManager.validate_tokens, StructuredOutputManager.grammar_bitmask,
            Scheduler.schedule) == first
