"""Tree speculation: the draft-tree type and the pure functions verification needs.

``draft``: the :class:`~specserve_vllm.tree.draft.DraftTree` value (DFS preorder, best child
first) with its ancestor mask, depth positions and root-to-leaf paths. ``compaction``: the KV
moves that make an accepted path contiguous. ``verify``: greedy and lossless sampling
verification over the target's logits. ``build``: tree drafts from the drafters (top-k trees
and DySpec dynamic trees). ``attention``: a reference tree attention; ``cpu_kv``: reading
K/V back from vLLM's CPU paged cache for it; ``plan``: a step's tree requests and position
shifts. See docs/trees.md.
"""
