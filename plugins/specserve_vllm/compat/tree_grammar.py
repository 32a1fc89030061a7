"""Grammar-pruned draft trees: structured-output requests verify trees the grammar allows.

A tree drafter hands the scheduler each tree as preorder tokens. vLLM's engine core keeps the
grammar (``StructuredOutputManager``) and reads drafts as a chain: ``validate_tokens`` keeps the
longest grammar-valid prefix and ``grammar_bitmask`` fills one mask row per draft after
accepting the drafts before it in list order. Both are wrong for a tree, so a structured-output
request used to verify only its tree's leading chain. Five wraps carry the tree's shape across
the two processes and prune it with the grammar (``docs/trees.md``, "Grammar-pruned trees"):

* worker, ``GPUModelRunner.sample_tokens``: when the drafts ride on the step's output
  (:mod:`~specserve_vllm.compat.draft_handoff`), the branching trees of structured-output
  requests ride with them (:data:`DRAFTED_ATTR`);
* engine core, ``Scheduler.update_from_output``: takes those trees off the output;
* engine core, ``StructuredOutputManager.validate_tokens`` (outermost): for a request whose
  drafts are its tree's preorder prefix, :func:`~specserve_vllm.tree.grammar.grammar_prune`
  drops the nodes the grammar rejects with their subtrees and computes every kept node's mask
  row in one walk of xgrammar's matcher (which ends where it started). A branching result, with
  the tokens the grammar forces after its leaves grafted on (jump-forward, best leaf first,
  within the request's draft cap), becomes the request's drafts and is kept with its rows; a
  chain goes on to upstream's check and jump-forward as before;
* engine core, ``Scheduler.schedule``: for the scheduled requests whose drafts are a branching
  prefix of their pruned tree (:func:`~specserve_vllm.tree.plan.scheduled_tree`, the rule the
  worker's step plan applies too), the tree goes to the worker on the ``SchedulerOutput``
  (:data:`SCHEDULED_ATTR`); :mod:`~specserve_vllm.compat.tree_steps` verifies that tree, never
  the drafter's own, for structured-output requests;
* engine core, ``StructuredOutputManager.grammar_bitmask``: those requests' drafts are passed to
  upstream as ``-1`` padding (so it advances nothing over them) and their rows are then
  overwritten with the kept rows. The runner applies rows by request order and draft count
  (``apply_grammar_bitmask``), so masked logits reach tree verification unchanged in layout.

The grammar does not move between ``validate_tokens`` (``post_step``) and the next
``schedule``: only ``update_from_output`` advances it, with the tokens a step emitted. Anything
else (async scheduling, no draft hand-off, a request still reasoning, a compiling grammar) finds
no tree and keeps upstream's chain path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from specserve_vllm.compat.draft_handoff import OUTPUT_ATTR
from specserve_vllm.compat.jump_forward import ready_grammar
from specserve_vllm.compat.upstream import SAMPLE_TOKENS, UpstreamFunction

logger = logging.getLogger(__name__)

_MARK = "_specserve_tree_grammar"
DRAFTED_ATTR = "_specserve_grammar_drafts"
"""``ModelRunnerOutput`` attribute: ``{req_id: DraftTree}``, the branching trees drafted for
structured-output requests this step (their tokens are the request's drafts)."""
DRAFTED_TREES_ATTR = "_specserve_trees"
"""Runner attribute :mod:`~specserve_vllm.compat.tree_steps` sets to the drafted trees
(``tree_steps.TREES_ATTR``; named here, which that module imports, so a step without trees
reads it without an import)."""
SCHEDULED_ATTR = "_specserve_grammar_trees"
"""``SchedulerOutput`` attribute: ``{req_id: DraftTree}``, the pruned trees scheduled this step."""
_DRAFTED = "_specserve_grammar_drafted"  # manager: the trees of the last output, until validated
_PENDING = "_specserve_grammar_pending"  # manager: {req_id: (pruned tree, rows)} until scheduled
_STEP = "_specserve_grammar_step"  # manager: (id of the step's draft dict, {req_id: (tree, rows)})
_WARNED: set[str] = set()

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: drafting happens inside it; the drafts ride on its output (draft_handoff).
    SAMPLE_TOKENS,
    # Wrapped: receives each step's model output in the engine core, before post_step.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                     "920d0ea4ca1444e0d51a1019d18c1d3248eaf0a6fa23ccfb1a0f77bdb533cb2f"),
    # Relied on: drafts become request.spec_token_ids through validate_tokens, after the output.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_draft_token_ids",
                     "d6dc1e96fb96d1d3b62ff7780f7e23ed6e00d2a5468f454434f69bfa66048b3c"),
    # Wrapped: schedules spec_token_ids[:n] of running requests, then clears them.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.schedule",
                     "86996b4510f0530ba3a2b3ddde93447bb386a62dc95b262137de53b2b07ff123"),
    # Relied on: one bitmask for the scheduled drafts, after schedule, before sampling.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.get_grammar_bitmask",
                     "b1280e9490990347164750a37cd9b882cc6ffc04e154e3d1d42dc292b906a242"),
    # Wrapped: the grammar-valid prefix of a request's drafts.
    UpstreamFunction("vllm.v1.structured_output", "StructuredOutputManager.validate_tokens",
                     "afead6e9119093aaabf4c171bf6cf4f976817f07a2827ac0248747d05b1bd59f"),
    # Wrapped: 1 + n rows per request in id order; -1 drafts advance nothing.
    UpstreamFunction("vllm.v1.structured_output", "StructuredOutputManager.grammar_bitmask",
                     "67b3e0e65ccde211b6155cf3a569e5b62712e0c63a16f4bfcddc0083db72c1c7"),
    # Relied on: the runner places each request's 1 + n rows at its logits rows.
    UpstreamFunction("vllm.v1.structured_output.utils", "apply_grammar_bitmask",
                     "ff0fc3bed0bec3cce4eb994dedaddd42235139e3e29b7b8a9c2612312aa6d95f"),
    # Relied on: each request's grammar holds its own xgrammar matcher (the tree walk runs on it
    # and restores it).
    UpstreamFunction("vllm.v1.structured_output.backend_xgrammar", "XgrammarBackend.compile_grammar",
                     "b1ebb9c0c209160857f2d3282d6caccb463828670cdb771ad937d0cd7e347ee6"),
)


def drafted_trees(runner: Any) -> dict[str, Any]:
    """``{req_id: DraftTree}``: this step's branching trees of structured-output requests."""
    trees = getattr(runner, DRAFTED_TREES_ATTR, None)
    if not trees:  # no trees drafted this step (chains, or nothing): the usual case
        return {}
    from specserve_vllm.tree.draft import best_path_length

    found = {}
    for req_id, tree in trees.items():
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        if params is not None and params.structured_outputs is not None and best_path_length(tree) < len(tree):
            found[req_id] = tree
    return found


def forced_chains(manager: Any, request: Any, grammar: Any, tree: Any) -> dict[int, list[int]]:
    """``{leaf: tokens}``: what ``grammar`` forces after each leaf's path, leaves in preorder
    (the best path's first) while the request's draft cap leaves room (jump-forward)."""
    from specserve_vllm.compat import jump_forward
    from specserve_vllm.tree.grammar import leaves

    room = jump_forward.request_cap(manager, request) - len(tree)
    if room <= 0:
        return {}
    encode = jump_forward.encoder(manager) if jump_forward.strings_enabled() else None
    scratch, vocab = jump_forward.scratch_bitmask(manager), int(manager.backend.vocab_size)
    chains = {}
    for leaf in leaves(tree):
        path = list(tree.path_to(leaf))
        forced = jump_forward.forced_tokens(grammar, request.request_id, path, len(path) + room, scratch, vocab, encode)
        if forced:
            chains[leaf] = forced
            room -= len(forced)
            if room <= 0:
                break
    return chains


def extend(manager: Any, request: Any, grammar: Any, pruned: Any, rows: Any) -> tuple[Any, Any]:
    """``(pruned, rows)`` with grammar-forced tokens grafted below its leaves (when jump-forward
    is on), and the mask rows of the grown tree; unchanged if nothing is forced or on error."""
    from specserve_vllm.compat import jump_forward
    from specserve_vllm.tree.grammar import graft, grammar_prune

    if not jump_forward.enabled():
        return pruned, rows
    try:
        chains = forced_chains(manager, request, grammar, pruned)
        if not chains:
            return pruned, rows
        grafted = graft(pruned, chains)
        grown, grown_rows = grammar_prune(grafted, grammar.matcher, int(manager.backend.vocab_size))
        if grown != grafted:  # forced tokens are allowed by construction; keep the safe tree if not
            raise ValueError("the grammar rejected a forced token")
    except Exception as exc:  # never let drafting take the engine down
        _skipped("jump-forward on a pruned tree skipped", request, exc)
        return pruned, rows
    return grown, grown_rows


def _skipped(what: str, request: Any, exc: Exception) -> None:
    """Log a skipped step: at warning level once per kind of error, then at debug (a systematic
    failure would repeat on every step)."""
    kind = f"{what}: {type(exc).__name__}"
    level = logging.DEBUG if kind in _WARNED else logging.WARNING
    _WARNED.add(kind)
    logger.log(level, what, extra={"fields": {"request_id": getattr(request, "request_id", None), "error": repr(exc)}})


def validate(manager: Any, original: Any, request: Any, spec_tokens: list[int]) -> list[int]:
    """The drafts a request keeps: its pruned tree (grown by grammar-forced tokens) when that
    branches, else upstream's chain."""
    from specserve_vllm.tree.draft import best_path_length
    from specserve_vllm.tree.grammar import grammar_prune
    from specserve_vllm.tree.plan import scheduled_tree

    req_id = request.request_id
    pending = manager.__dict__.setdefault(_PENDING, {})
    pending.pop(req_id, None)
    # the drafts must be a branching prefix of the drafted tree, constrained from the start
    drafted = scheduled_tree((manager.__dict__.get(_DRAFTED) or {}).pop(req_id, None), spec_tokens)
    grammar = ready_grammar(manager, request) if drafted is not None else None
    if grammar is None:
        return original(manager, request, spec_tokens)
    try:
        pruned, rows = grammar_prune(drafted, grammar.matcher, int(manager.backend.vocab_size))
    except Exception as exc:  # the drafts then go the chain way, which is lossless
        _skipped("grammar pruning skipped", request, exc)
        return original(manager, request, spec_tokens)
    if best_path_length(pruned) == len(pruned):  # a chain: valid as it is; jump-forward may extend it
        return original(manager, request, list(pruned.tokens))
    pruned, rows = extend(manager, request, grammar, pruned, rows)
    pending[req_id] = (pruned, rows)
    return list(pruned.tokens)


def step_trees(manager: Any, requests: dict[str, Any], scheduler_output: Any) -> dict[str, Any]:
    """Move the scheduled requests' pruned trees out of the pending ones; ``{req_id: (tree,
    rows)}`` for those whose scheduled drafts are a branching prefix of the tree."""
    from specserve_vllm.tree.plan import scheduled_tree

    pending = manager.__dict__.get(_PENDING)
    if not pending:
        return {}
    drafts = scheduler_output.scheduled_spec_decode_tokens
    found = {}
    for req_id in scheduler_output.num_scheduled_tokens:
        entry = pending.pop(req_id, None)
        if entry is None:
            continue
        tree = scheduled_tree(entry[0], drafts.get(req_id, ()))
        if tree is not None:
            found[req_id] = (tree, entry[1])
    for req_id in [r for r in pending if r not in requests]:
        del pending[req_id]  # finished or aborted before they were scheduled again
    return found


def overwrite_rows(bitmask: Any, ids: list[str], drafts: dict[str, list[int]], trees: dict[str, Any]) -> None:
    """Write each tree request's kept rows (root row, then one per scheduled node) over its
    ``1 + n`` rows of ``bitmask``, laid out per request in ``ids`` order as upstream fills it."""
    offset = 0
    for req_id in ids:
        n = len(drafts.get(req_id, ()))
        if req_id in trees:
            bitmask[offset : offset + n + 1] = trees[req_id][1][: n + 1]
        offset += n + 1


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specserve_vllm.compat import draft_handoff, jump_forward

    if getattr(StructuredOutputManager.grammar_bitmask, _MARK, False):
        return
    # These wraps go outside the hand-off's (sample_tokens sets the drafts this one reads) and
    # jump-forward's (a branching tree must not be extended as a chain): install those first.
    draft_handoff.apply()
    jump_forward.apply()
    sample = GPUModelRunner.sample_tokens
    update = Scheduler.update_from_output
    schedule = Scheduler.schedule
    validate_tokens_up = StructuredOutputManager.validate_tokens
    bitmask_up = StructuredOutputManager.grammar_bitmask

    @functools.wraps(sample)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = sample(self, *args, **kwargs)
        if OUTPUT_ATTR in getattr(out, "__dict__", {}):
            trees = drafted_trees(self)
            if trees:
                setattr(out, DRAFTED_ATTR, trees)
        return out

    @functools.wraps(update)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any,
                           *args: Any, **kwargs: Any) -> Any:
        trees = getattr(model_runner_output, "__dict__", {}).pop(DRAFTED_ATTR, None)
        setattr(self.structured_output_manager, _DRAFTED, trees or {})
        return update(self, scheduler_output, model_runner_output, *args, **kwargs)

    @functools.wraps(validate_tokens_up)
    def validate_tokens(self: Any, request: Any, spec_tokens: list[int]) -> list[int]:
        if not request.use_structured_output:  # no grammar, no tree of it: upstream's (identity)
            return validate_tokens_up(self, request, spec_tokens)
        return validate(self, validate_tokens_up, request, spec_tokens)

    @functools.wraps(schedule)
    def schedule_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = schedule(self, *args, **kwargs)
        manager = self.structured_output_manager
        trees = step_trees(manager, self.requests, out)
        setattr(manager, _STEP, (id(out.scheduled_spec_decode_tokens), trees))
        if trees:
            setattr(out, SCHEDULED_ATTR, {r: t for r, (t, _) in trees.items()})
        return out

    @functools.wraps(bitmask_up)
    def grammar_bitmask(self: Any, requests: Any, ids: list[str], drafts: dict[str, list[int]]) -> Any:
        key, trees = getattr(self, _STEP, (None, {}))
        present = [r for r in ids if r in trees] if key == id(drafts) else []
        if not present:
            return bitmask_up(self, requests, ids, drafts)
        padded = dict(drafts)
        for req_id in present:
            padded[req_id] = [-1] * len(drafts[req_id])
        out = bitmask_up(self, requests, ids, padded)
        overwrite_rows(out, ids, drafts, {r: trees[r] for r in present})
        return out

    for fn in (sample_tokens, update_from_output, validate_tokens, schedule_step, grammar_bitmask):
        setattr(fn, _MARK, True)
    GPUModelRunner.sample_tokens = sample_tokens  # type: ignore[method-assign]
    Scheduler.update_from_output = update_from_output  # type: ignore[method-assign]
    Scheduler.schedule = schedule_step  # type: ignore[method-assign]
    StructuredOutputManager.validate_tokens = validate_tokens  # type: ignore[method-assign]
    StructuredOutputManager.grammar_bitmask = grammar_bitmask  # type: ignore[method-assign]
    logger.debug("installed grammar-pruned draft trees")
