"""Medusa and Hydra heads as a vLLM ``custom_class`` proposer.

Selected with::

    SPECSERVE_HEADS_DIR=/path/to/heads  # a head checkpoint (config.json + heads.safetensors)
    speculative_config = {"method": "custom_class",
                          "model": "specserve_vllm.heads.proposer.HydraProposer",
                          "num_speculative_tokens": 4}

The checkpoint directory is the engine setting ``heads_dir``
(:mod:`specserve.engine.settings`) because vLLM instantiates the class with the engine config
only. :mod:`specserve_vllm.compat.hidden_feed` hands the proposer each request's last hidden
state before ``propose``; the heads score with the target's own LM head and input embeddings,
taken from the loaded target model. Drafts are greedy chains of length
``num_speculative_tokens`` (at most the number of heads), cut at the model length, unless the
engine setting ``tree`` asks for trees (``static`` or ``dynamic``, :mod:`specserve_vllm.heads.trees`):
then each row drafts a tree of at most that many nodes (which may exceed the number of heads:
the heads bound its depth, not its width), kept in ``last_trees`` for
:mod:`specserve_vllm.compat.tree_steps`. Heads with prefix attention keep chains (their
committed-position feed assumes a chain).

Hydra heads with ``prefix_attention`` read ``z`` of their prefix block instead of the last
hidden state: the proposer sets ``needs_positions``, so the feed also calls
:meth:`HeadsProposer.observe_positions` with every request's newly committed positions, which
:class:`~specserve_vllm.heads.prefix_cache.PrefixCache` turns into per-request keys/values
(freed when vLLM reports the request finished).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from specserve.engine.settings import HEADS_ENV
from specserve.engine import settings
from specserve_vllm.spec_k import PlannedLengths, bounded_room
from specserve_vllm.heads.checkpoint import load_heads
from specserve_vllm.heads.config import CheckpointError, HeadsConfig, read_config
from specserve_vllm.heads.prefix_cache import PrefixCache
from specserve_vllm.heads.registry import resolve_head_class
from specserve_vllm.heads.trees import heads_tree
from specserve_vllm.tree.draft import DraftTree

logger = logging.getLogger(__name__)



def target_weights(target_model: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lm_head [vocab, d], input_embedding [vocab, d])`` of a loaded vLLM decoder model."""
    lm_head = getattr(getattr(target_model, "lm_head", None), "weight", None)
    inner = getattr(target_model, "model", None)
    embed = getattr(getattr(inner, "embed_tokens", None), "weight", None)
    if lm_head is None or embed is None:
        raise CheckpointError(f"cannot find lm_head/embed_tokens on {type(target_model).__name__}")
    return lm_head[:vocab_size].detach(), embed[:vocab_size].detach()


class HeadsProposer:
    """Greedy chain drafts from Medusa or Hydra heads on the target's hidden states."""

    kind: str | None = None  # set by subclasses: the checkpoint kind they accept

    def __init__(self, vllm_config: Any) -> None:
        directory = settings.current().heads_dir
        if not directory:
            raise CheckpointError(f"{type(self).__name__} needs {HEADS_ENV} set to a head checkpoint directory")
        self.directory = directory
        self.config: HeadsConfig = read_config(directory)
        if self.kind is not None and self.config.kind != self.kind:
            raise CheckpointError(f"{directory} holds {self.config.kind} heads, not {self.kind}")
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        shape = settings.current().tree
        if shape != "chain" and self.config.prefix_attention:
            logger.warning("heads with prefix attention draft chains, not trees",
                           extra={"fields": {"tree": shape, "heads": directory}})
            shape = "chain"
        if shape == "chain" and self.num_speculative_tokens > self.config.num_heads:
            raise CheckpointError(
                f"num_speculative_tokens={self.num_speculative_tokens} exceeds the "
                f"{self.config.num_heads} heads in {directory} (a chain drafts one token per head; "
                "trees may hold more nodes than there are heads)"
            )
        model_config = vllm_config.model_config
        self.model_config = model_config
        self.max_rows = int(getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", 1) or 1)
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        hidden = int(model_config.get_hidden_size())
        if (hidden, self.vocab_size) != (self.config.hidden_size, self.config.vocab_size):
            raise CheckpointError(
                f"heads in {directory} are for hidden={self.config.hidden_size} vocab={self.config.vocab_size}, "
                f"the target has hidden={hidden} vocab={self.vocab_size}"
            )
        self.heads: torch.nn.Module | None = None
        self.lm_head: torch.Tensor | None = None
        self.embed: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self.prefix_cache: PrefixCache | None = None
        self._req_ids: list[str] = []
        self._planned = PlannedLengths()
        self.tree_shape: str = shape
        self.last_trees: list[DraftTree | None] = []
        """Per row of the last ``propose``: the drafted tree (tree shapes only), else None."""

    @property
    def needs_positions(self) -> bool:
        """Whether the feed should call :meth:`observe_positions` (prefix attention only)."""
        return bool(self.config.prefix_attention)

    def load_model(self, target_model: Any = None, *args: Any, **kwargs: Any) -> None:
        """Load the heads next to the target model (same device and dtype as its LM head)."""
        self.lm_head, self.embed = target_weights(target_model, self.vocab_size)
        cls = resolve_head_class(self.config, self.model_config)
        _, self.heads = load_heads(self.directory, device=self.lm_head.device, dtype=self.lm_head.dtype,
                                   head_class=cls)
        prefix = getattr(self.heads, "prefix", None)
        if prefix is not None:
            self.prefix_cache = PrefixCache(prefix)
        logger.info("loaded %s heads from %s (%d heads, drafting %d)", self.config.kind, self.directory,
                    self.config.num_heads, self.num_speculative_tokens)
        self.warm_up()

    def warm_up(self) -> None:
        """Draft once at every row count the engine can batch (1 .. ``max_num_seqs``) with every
        head. On CPU a bf16 matmul's first call at a new number of rows builds its kernel (about
        5 ms against a 3 ms draft, measured on the demo model): without this, each batch size's
        first speculative step in the engine's life paid it. Only there: fp32 and other devices
        have no such first-call cost, and 256 rows of a large model's heads would take a while."""
        if self.heads is None or self.lm_head is None or self.embed is None:
            return
        if self.lm_head.device.type != "cpu" or self.lm_head.dtype not in (torch.bfloat16, torch.float16):
            return
        start = time.perf_counter()
        d = int(self.config.hidden_size)
        for rows in range(1, self.max_rows + 1):
            hidden = torch.zeros(rows, d, dtype=self.lm_head.dtype, device=self.lm_head.device)
            first = torch.zeros(rows, dtype=torch.long, device=self.lm_head.device)
            self.heads.draft(hidden, first, self.lm_head, self.embed, self.chain_depth)
        logger.info("warmed up the heads", extra={"fields": {"rows": self.max_rows,
                                                             "ms": round((time.perf_counter() - start) * 1e3, 1)}})

    def observe_hidden(self, hidden: torch.Tensor | None) -> None:
        """This step's last hidden state per request (``[num_reqs, d]``), before ``propose``."""
        self._hidden = hidden

    def observe_positions(self, feed: Any) -> None:
        """This step's committed positions per request (a ``hidden_feed.CommittedPositions``)."""
        if self.prefix_cache is None:
            return
        self.prefix_cache.finish(feed.finished)
        for req_id, start, hidden, tokens in zip(feed.req_ids, feed.starts, feed.hidden, feed.tokens):
            self.prefix_cache.commit(req_id, start, hidden, tokens)
        self._req_ids = list(feed.req_ids)

    def _head_inputs(self, hidden: torch.Tensor | None, num_reqs: int) -> torch.Tensor | None:
        """``[num_reqs, d]`` heads' inputs: the fed hidden states, or the prefix block's ``z``."""
        if self.prefix_cache is None or hidden is None:
            return hidden
        if len(self._req_ids) != num_reqs:
            return None
        rows = [self.prefix_cache.head_input(r) for r in self._req_ids]
        # A request without cached positions (cannot happen once it sampled) drafts from h_p.
        return torch.stack([z.to(device=hidden.device, dtype=hidden.dtype) if z is not None else hidden[i]
                            for i, z in enumerate(rows)])

    @property
    def chain_depth(self) -> int:
        """The longest chain the heads draft (one token per head)."""
        return int(self.config.num_heads)

    def set_draft_lengths(self, lengths: Any, chains: bool = False) -> None:
        """This step's planned draft length per row (``[num_reqs]``), used by the next ``propose``;
        ``chains``: draft chains this once even in tree mode.

        Rows planned at 0 are not drafted; the heads run only as deep as the longest plan.
        The prefix cache is fed by ``observe_positions`` whatever the plan."""
        self._planned.set(lengths, chains)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        hidden, self._hidden = self._hidden, None
        hidden = self._head_inputs(hidden, num_reqs)
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        n = np.asarray(num_tokens_no_spec[:num_reqs], dtype=np.int64)
        room = np.minimum(self.num_speculative_tokens, self.max_model_len - n)
        shape = self._planned.shape(self.tree_shape)
        room = bounded_room(room, self._planned.take(num_reqs))  # [num_reqs]
        rows = [r for r in range(num_reqs) if sampled_token_ids[r] and room[r] > 0]
        if not rows or hidden is None or hidden.shape[0] != num_reqs or self.heads is None:
            return drafts
        assert self.lm_head is not None and self.embed is not None
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        first = torch.tensor([sampled_token_ids[r][-1] for r in rows], dtype=torch.long, device=hidden.device)
        states = hidden.index_select(0, index).to(self.lm_head.dtype)
        if shape != "chain":
            self.last_trees = [None] * num_reqs
            for i, r in enumerate(rows):
                tree = heads_tree(self.heads, states[i], int(first[i]), self.lm_head, self.embed,
                                  shape, int(room[r]))
                self.last_trees[r] = tree
                drafts[r] = list(tree.tokens)
            return drafts
        depth = min(int(max(room[r] for r in rows)), self.chain_depth)
        lengths = torch.tensor([min(int(room[r]), depth) for r in rows], dtype=torch.long)  # each row to its own
        tokens = self.heads.draft(states, first, self.lm_head, self.embed, depth, lengths)
        for r, chain in zip(rows, tokens.tolist()):
            drafts[r] = chain[: int(room[r])]
        return drafts


class MedusaProposer(HeadsProposer):
    """Medusa heads (independent)."""

    kind = "medusa"


class HydraProposer(HeadsProposer):
    """Hydra heads (each sees the tokens drafted before it)."""

    kind = "hydra"
