"""The demo model's recipe: pure parts (schedule, split, corpus, fingerprint, tokenizer files)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from specserve.demo.corpus import chat_wrap, is_heldout, json_document, json_documents, python_sources
from specserve.demo.spec import CHAT_TEMPLATE, DemoSpec
from specserve.demo.train import lr_at


@given(st.integers(min_value=0, max_value=2000))
def test_lr_stays_between_floor_and_peak(step: int) -> None:
    lr = lr_at(step, steps=1000, warmup=20, peak=3e-3, min_ratio=0.05)
    assert 3e-3 * 0.05 - 1e-12 <= lr <= 3e-3 + 1e-12


def test_lr_peaks_after_warmup_and_decays() -> None:
    kw = dict(steps=100, warmup=10, peak=1.0, min_ratio=0.1)
    assert lr_at(5, **kw) < lr_at(10, **kw)
    assert lr_at(10, **kw) == 1.0
    assert lr_at(50, **kw) > lr_at(90, **kw)


def test_heldout_split_is_stable_and_about_the_modulus() -> None:
    names = [f"pkg/mod_{i}.py" for i in range(4000)]
    held = [n for n in names if is_heldout(n, 40)]
    assert held == [n for n in names if is_heldout(n, 40)]
    assert 40 <= len(held) <= 180  # ~1/40 of 4000


def test_generated_json_parses_and_is_deterministic() -> None:
    docs = json_documents(200, seed=7)
    assert docs == json_documents(200, seed=7)
    for doc in docs:
        json.loads(doc, strict=True)
    assert len(set(docs)) > 190
    assert json_document(random.Random(1)) == json_document(random.Random(1))


def test_stdlib_corpus_is_python() -> None:
    first = next(iter(python_sources()))
    assert first.relpath.endswith(".py")
    compile(first.text, first.relpath, "exec")


def test_fingerprint_changes_with_the_recipe() -> None:
    spec = DemoSpec()
    assert spec.fingerprint() == DemoSpec().fingerprint()
    assert replace(spec, steps=spec.steps + 1).fingerprint() != spec.fingerprint()


def test_chat_wrap_matches_the_chat_template() -> None:
    from jinja2 import Template

    rendered = Template(CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{}"}],
        add_generation_prompt=False,
    )
    assert rendered == chat_wrap("hi", "{}")
