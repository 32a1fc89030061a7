"""Hydra++ prefix attention: shapes, checkpoint round trip, inference path == training path,
the committed-position feed's alignment, and the per-request cache's lifetime."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specserve.head_training.data import Distilled
from specserve.head_training.train import all_head_inputs, gather, sample_batch
from specserve_vllm.compat import hidden_feed
from specserve_vllm.heads.checkpoint import load_heads, save_heads
from specserve_vllm.heads.config import CheckpointError, HeadsConfig
from specserve_vllm.heads.model import HydraHeads, build_heads
from specserve_vllm.heads.prefix import PrefixAttention
from specserve_vllm.heads.prefix_cache import PrefixCache
from specserve.engine import settings
from specserve_vllm.heads.proposer import HydraProposer

D, VOCAB = 16, 24


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _config(**extra: object) -> HeadsConfig:
    return HeadsConfig(kind="hydra", num_heads=3, hidden_size=D, vocab_size=VOCAB, num_layers=2,
                       prefix_attention=True, **extra)  # type: ignore[arg-type]


def test_shapes_and_identity_at_init() -> None:
    heads = build_heads(_config())
    assert isinstance(heads, HydraHeads) and isinstance(heads.prefix, PrefixAttention)
    seqs = torch.randn(2, 7, D)
    assert torch.equal(heads.head_inputs(seqs), seqs)  # zero output projections: z = h
    _randomize(heads)
    z = heads.head_inputs(seqs)
    assert z.shape == (2, 7, D) and not torch.allclose(z, seqs)
    assert heads(z[:, -1], torch.randn(2, 3, D)).shape == (2, 3, D)


def test_prefix_attention_is_causal() -> None:
    layer = PrefixAttention(D, 4)
    _randomize(layer)
    a = torch.randn(1, 6, D)
    b = a.clone()
    b[:, 4:] = torch.randn(1, 2, D)  # change the future only
    za, zb = layer(a), layer(b)
    assert torch.allclose(za[:, :4], zb[:, :4], atol=1e-6)
    assert not torch.allclose(za[:, 4], zb[:, 4])


def test_config_checks() -> None:
    with pytest.raises(CheckpointError, match="Hydra option"):
        HeadsConfig(kind="medusa", num_heads=2, hidden_size=D, vocab_size=VOCAB, prefix_attention=True)
    with pytest.raises(CheckpointError, match="prefix_heads"):
        _config(prefix_heads=0)
    # Checkpoints written before the option read as plain Hydra.
    old = {k: v for k, v in _config().to_dict().items() if not k.startswith("prefix")}
    assert HeadsConfig.from_dict(old).prefix_attention is False


def test_checkpoint_round_trip_with_prefix_attention(tmp_path: Path) -> None:
    config = _config(training={"fingerprint": "abc"})
    heads = build_heads(config)
    _randomize(heads)
    save_heads(tmp_path / "ck", config, heads)
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["prefix_attention"] is True and saved["prefix_heads"] == 4
    loaded_config, loaded = load_heads(tmp_path / "ck")
    assert loaded_config == config
    seqs, tokens = torch.randn(2, 5, D), torch.randn(2, 3, D)
    assert torch.equal(loaded.head_inputs(seqs), heads.head_inputs(seqs))
    assert torch.equal(loaded(seqs[:, -1], tokens), heads(seqs[:, -1], tokens))
    plain = HeadsConfig(kind="hydra", num_heads=3, hidden_size=D, vocab_size=VOCAB, num_layers=2)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(plain.to_dict()))
    with pytest.raises(CheckpointError, match="do not match"):  # prefix weights without the option
        load_heads(tmp_path / "ck")


@pytest.mark.parametrize("chunks", [[9], [1] * 9, [4, 1, 2, 2], [3, 6]])
def test_incremental_extend_equals_the_full_causal_pass(chunks: list[int]) -> None:
    layer = PrefixAttention(D, 4).double()
    _randomize(layer, seed=2)
    h = torch.randn(9, D, dtype=torch.float64)
    full = layer(h[None])[0]
    keys = values = torch.zeros(0, 4, D // 4, dtype=torch.float64)
    start, pieces = 0, []
    for n in chunks:
        z, keys, values = layer.extend(h[start : start + n], torch.arange(start, start + n), keys, values)
        pieces.append(z)
        start += n
    assert torch.allclose(torch.cat(pieces), full, atol=1e-10)


def _runner(req_ids: list[str], computed: list[int], tokens: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(input_batch=SimpleNamespace(
        req_ids=req_ids, num_computed_tokens_cpu=np.array(computed), token_ids_cpu=tokens))


def test_committed_positions_follow_the_accepted_tokens() -> None:
    # Request a: prompt chunk of 4 (positions 0..3). Request b: decode of x[5] plus drafts at
    # positions 5..7, one draft accepted: positions 5, 6 are committed, row 7 is not.
    tokens = np.arange(40).reshape(2, 20)
    hidden = torch.arange(7.0)[:, None]  # rows: a0 a1 a2 a3 | b5 b6 b7
    sched = SimpleNamespace(num_scheduled_tokens={"a": 4, "b": 3}, scheduled_spec_decode_tokens={"b": [1, 2]},
                            finished_req_ids={"gone"})
    feed = hidden_feed.committed_positions(_runner(["a", "b"], [0, 5], tokens), sched, [[9], [7, 8]], hidden)
    assert feed is not None and feed.req_ids == ["a", "b"] and feed.starts == [0, 5]
    assert [h[:, 0].tolist() for h in feed.hidden] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]
    assert [t.tolist() for t in feed.tokens] == [[0, 1, 2, 3], list(range(20, 27))]
    assert feed.finished == frozenset({"gone"})
    assert hidden_feed.committed_positions(_runner([], [], tokens), sched, torch.zeros(1), hidden) is None


def test_cache_over_engine_like_steps_matches_training_inputs() -> None:
    """Feeding a sequence the way vLLM does (chunked prefill, then decode steps with rejections)
    leaves the cache's z equal to training's ``z_p`` at the last committed position."""
    heads = build_heads(_config())
    _randomize(heads, seed=5)
    heads = heads.double()
    seq = torch.randn(1, 12, D, dtype=torch.float64)  # the target's states on the final sequence
    data = Distilled(tokens=torch.arange(12)[None], hidden=seq, prompt_tokens=5)
    z_train = all_head_inputs(heads, data)[0]
    cache = PrefixCache(heads.prefix)
    tokens = np.arange(12)
    # prefill in chunks 0..2, 3..4; decode: scheduled 5..8 (1 accepted: 5, 6 commit); then 7..9 all
    # accepted (rows 7, 8, 9 commit); the rejected rows carry garbage states that must not matter.
    cache.commit("r", 0, seq[0, 0:3], tokens)
    cache.commit("r", 3, seq[0, 3:5], tokens)
    assert torch.allclose(cache.head_input("r"), z_train[4])
    scheduled = torch.cat([seq[0, 5:7], torch.randn(2, D, dtype=torch.float64)])
    count = hidden_feed.committed_counts([4], [3], [2])[0]
    cache.commit("r", 5, scheduled[:count], tokens)
    assert torch.allclose(cache.head_input("r"), z_train[6])
    cache.commit("r", 7, seq[0, 7:10], tokens)
    assert torch.allclose(cache.head_input("r"), z_train[9])


def test_cache_frees_finished_requests_and_reuses_shared_prefixes() -> None:
    layer = PrefixAttention(D, 4)
    _randomize(layer, seed=1)
    h = torch.randn(10, D)
    tokens = np.arange(10)
    cache = PrefixCache(layer, retain_bytes=0)
    cache.commit("a", 0, h[:6], tokens)
    cache.commit("b", 0, h[:3], tokens)
    cache.finish({"a"})
    assert set(cache.live) == {"b"} and not cache.retired and cache.head_input("a") is None
    # A prefix-cache hit (start 4 on an empty cache) copies positions 0..3 from a donor.
    keep = PrefixCache(layer)
    keep.commit("a", 0, h[:6], tokens)
    keep.finish({"a"})
    assert "a" in keep.retired and not keep.live
    keep.commit("c", 4, h[4:7], tokens)
    assert keep.stats["copied_positions"] == 4
    assert torch.allclose(keep.head_input("c"), layer(h[None, :7])[0, -1], atol=1e-5)
    # No donor: it attends to what it has, and says so.
    keep.commit("d", 3, h[3:5], np.arange(100, 110))
    assert keep.stats["missing_positions"] == 3 and keep.live["d"].positions.tolist() == [3, 4]
    # A recomputed request (preempted) starts over at position 0.
    keep.commit("c", 0, h[:2], tokens)
    assert keep.live["c"].positions.tolist() == [0, 1] and keep.stats["rewinds"] == 1


def test_training_batches_read_z_at_the_sampled_positions() -> None:
    heads = build_heads(_config())
    _randomize(heads, seed=3)
    data = Distilled(tokens=torch.randint(0, VOCAB, (5, 10)), hidden=torch.randn(5, 10, D), prompt_tokens=2)
    gen = torch.Generator().manual_seed(0)
    inputs, nxt, teacher = sample_batch(heads, data, 64, 3, gen)
    assert inputs.shape == (64, D) and nxt.shape == (64, 3) and teacher.shape == (64, 3, D)
    z = all_head_inputs(heads, data)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 5, (32,), generator=gen)
    pos = torch.randint(0, 7, (32, 2), generator=gen)
    assert torch.allclose(inputs, z[seqs.repeat_interleave(2), pos.reshape(-1)], atol=1e-5)
    _, nxt_ref, _ = gather(data, seqs.repeat_interleave(2), pos.reshape(-1), 3)
    assert torch.equal(nxt, nxt_ref)


def test_proposer_drafts_from_the_cached_z(tmp_path: Path) -> None:
    config = _config()
    heads = build_heads(config)
    _randomize(heads, seed=4)
    save_heads(tmp_path / "hpa", config, heads)
    vllm_config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=3),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: VOCAB, get_hidden_size=lambda: D,
                                     model_impl="auto", convert_type="none"))
    with settings.override(heads_dir=str(tmp_path / "hpa")):
        proposer = HydraProposer(vllm_config)
    assert proposer.needs_positions
    lm, emb = torch.randn(VOCAB, D), torch.randn(VOCAB, D)
    proposer.load_model(SimpleNamespace(lm_head=SimpleNamespace(weight=lm),
                                        model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=emb))))
    assert proposer.prefix_cache is not None
    h = torch.randn(2, 5, D)
    feed = hidden_feed.CommittedPositions(req_ids=["x", "y"], starts=[0, 0], hidden=[h[0], h[1, :3]],
                                          tokens=[np.arange(5), np.arange(3)], finished=frozenset())
    proposer.observe_positions(feed)
    proposer.observe_hidden(torch.stack([h[0, -1], h[1, 2]]))
    drafts = proposer.propose([[4], [6]], np.array([6, 4]), np.zeros((2, 64), dtype=np.int64))
    loaded = proposer.heads
    z = torch.stack([loaded.head_inputs(h[:1])[0, -1], loaded.head_inputs(h[1:, :3])[0, -1]])
    expected = loaded.draft(z, torch.tensor([4, 6]), lm, emb, 3).tolist()
    assert drafts == expected
    proposer.observe_positions(hidden_feed.CommittedPositions(
        req_ids=["y"], starts=[3], hidden=[h[1, 3:4]], tokens=[np.arange(4)], finished=frozenset({"x"})))
    assert set(proposer.prefix_cache.live) == {"y"}
