"""Grammar pruning of draft trees with xgrammar's tree walk, checked against a matcher that
accepts each node's path token by token (the real xgrammar, a small vocabulary)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import xgrammar
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.tree import grammar
from specserve_vllm.tree.draft import DraftTree, from_topological

VOCAB = ["a", "b", "c", "d", "{", "}", '"', ":", "1", "</s>"]
STOP = VOCAB.index("</s>")


@pytest.fixture(scope="module")
def compiled() -> xgrammar.CompiledGrammar:
    info = xgrammar.TokenizerInfo(VOCAB, stop_token_ids=[STOP])
    return xgrammar.GrammarCompiler(info).compile_regex(r"a(b|c)+d|\{\"a\":1\}")


def _path_ok_and_mask(compiled: xgrammar.CompiledGrammar, prefix: list[int], path: tuple[int, ...]
                      ) -> tuple[bool, np.ndarray | None]:
    """The oracle: a fresh matcher accepts ``prefix`` then ``path`` token by token; the mask after."""
    matcher = xgrammar.GrammarMatcher(compiled)
    for tok in prefix:
        assert matcher.accept_token(tok)
    for tok in path:
        if not matcher.accept_token(tok):
            return False, None
    mask = xgrammar.allocate_token_bitmask(1, len(VOCAB))
    matcher.fill_next_token_bitmask(mask)
    return True, mask.numpy()[0]


def test_docstring_examples() -> None:
    assert doctest.testmod(grammar).failed == 0


def test_a_hand_made_tree_loses_the_branches_the_grammar_rejects(compiled: xgrammar.CompiledGrammar) -> None:
    a, b, c, d = 0, 1, 2, 3
    # root -> a -> {b -> {d, a}, d}, root -> b
    tree = DraftTree((a, b, d, a, d, b), (-1, 0, 1, 1, 0, -1))
    matcher = xgrammar.GrammarMatcher(compiled)
    pruned, rows = grammar.grammar_prune(tree, matcher, len(VOCAB))
    assert pruned == DraftTree((a, b, d), (-1, 0, 1))
    assert rows.shape[0] == len(pruned) + 1
    assert grammar.allowed(rows, 0, a) and not grammar.allowed(rows, 0, b)  # the committed state
    assert grammar.allowed(rows, 2, c) and grammar.allowed(rows, 2, d) and not grammar.allowed(rows, 2, a)
    assert matcher.accept_token(a) and matcher.accept_token(c)  # the matcher was left at its start


@settings(max_examples=60, deadline=None)
@given(parents=st.lists(st.integers(-1, 12), max_size=12), tokens=st.lists(st.integers(0, len(VOCAB) - 2),
                                                                           min_size=12, max_size=12),
       prefix_len=st.integers(0, 2))
def test_pruning_keeps_exactly_the_nodes_whose_path_the_grammar_accepts(
    compiled: xgrammar.CompiledGrammar, parents: list[int], tokens: list[int], prefix_len: int
) -> None:
    parents = [min(p, i - 1) for i, p in enumerate(parents)]
    tree = from_topological(tokens[: len(parents)], parents)[0]
    prefix = [0, 1][:prefix_len]  # "a", "ab": states inside the first alternative
    matcher = xgrammar.GrammarMatcher(compiled)
    for tok in prefix:
        assert matcher.accept_token(tok)
    pruned, rows = grammar.grammar_prune(tree, matcher, len(VOCAB))
    expected = [i for i in range(len(tree)) if _path_ok_and_mask(compiled, prefix, tree.path_to(i))[0]]
    assert len(pruned) == len(expected)
    kept_paths = [pruned.path_to(i) for i in range(len(pruned))]
    assert kept_paths == [tree.path_to(i) for i in expected]
    for row, path in enumerate([(), *kept_paths]):
        ok, mask = _path_ok_and_mask(compiled, prefix, path)
        assert ok and mask is not None
        assert [grammar.allowed(rows, row, t) for t in range(len(VOCAB))] == \
            [grammar.allowed(mask[None, :], 0, t) for t in range(len(VOCAB))], path
    # the matcher is where it started: it accepts what a fresh one at the prefix accepts
    fresh = _path_ok_and_mask(compiled, prefix, ())[1]
    after = xgrammar.allocate_token_bitmask(1, len(VOCAB))
    matcher.fill_next_token_bitmask(after)
    assert np.array_equal(after.numpy()[0], fresh)
