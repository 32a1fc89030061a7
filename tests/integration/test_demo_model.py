"""The shipped demo model is genuinely trained and loads as a Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def record(demo_model_dir: Path) -> dict:
    return json.loads((demo_model_dir / "record.json").read_text())


def test_heldout_bits_per_byte_well_below_untrained(record: dict) -> None:
    trained = record["heldout"]["code"]["bits_per_byte"]
    untrained = record["untrained"]["code"]["bits_per_byte"]
    assert trained < 0.75 * untrained, (trained, untrained)
    assert record["heldout"]["json"]["bits_per_byte"] < trained  # JSON is easier than code


def test_tokenizer_round_trips_and_has_the_chat_template(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    text = 'def f(x):\n    return {"a": [1, 2.5, null]}  # ünïcode\n'
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    # a bare newline is its own token, so a prompt ending in "\n" does not force a dedent
    ids = tok.encode("def f():\n")
    assert tok.decode(ids[-1:]) == "\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_greedy_samples_look_like_python_and_json(record: dict) -> None:
    code = "".join(s["completion"] for s in record["samples"] if not s["prompt"].startswith("{"))
    keywords = ("def ", "return", "self", "import", " = ", "if ", "(", "    ")
    assert sum(k in code for k in keywords) >= 4, code
    js = [s for s in record["samples"] if s["prompt"].startswith("{")]
    assert js and all('",' in s["completion"] and '": "' in s["completion"] for s in js), js
