"""The demo model's tool-tuning data: generated chats, their rendering and the trained spans."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jsonschema
import pytest

from specserve.demo.spec import TOOL_CALL_START, DemoSpec
from specserve.demo.tool_chats import BY_NAME, tool_chats
from specserve.demo.tool_tuning import encode, render


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    from specserve.demo import ARTIFACT_DIR

    return PreTrainedTokenizerFast.from_pretrained(str(ARTIFACT_DIR))


def test_chats_are_deterministic_and_mixed() -> None:
    chats = tool_chats(400, seed=3, call_share=0.75)
    assert [c.messages for c in chats] == [c.messages for c in tool_chats(400, seed=3, call_share=0.75)]
    calling = [c for c in chats if c.calls]
    assert 0.65 < len(calling) / len(chats) < 0.85
    assert any(len(c.calls) == 2 for c in calling), "some chats make two calls"
    assert any(m["role"] == "tool" for c in calling for m in c.messages), "some carry a tool result"


def test_every_call_names_an_offered_tool_with_valid_arguments() -> None:
    for chat in tool_chats(300, seed=5, call_share=1.0):
        offered = {t["function"]["name"] for t in chat.tools}
        for name, arguments in chat.calls:
            assert name in offered
            jsonschema.validate(json.loads(arguments), BY_NAME[name].parameters)
        for value in (json.loads(a) for _, a in chat.calls):
            for v in value.values():  # every argument value is written in the ask
                assert str(v) in chat.messages[0]["content"]


def test_only_assistant_turns_are_trained(tokenizer: Any) -> None:
    chat = next(c for c in tool_chats(200, seed=9, call_share=1.0) if len(c.messages) > 2)
    full, spans = render(tokenizer, chat)
    assert full == tokenizer.apply_chat_template(chat.messages, tools=chat.tools, tokenize=False)
    row = encode(tokenizer, chat)
    trained = tokenizer.decode([t for t, m in zip(row.ids, row.trained) if m])
    answers = [full[a:b] for a, b in spans]
    assert trained == "".join(answers)
    assert answers[0].startswith(TOOL_CALL_START) and answers[0].endswith("<|end|>\n")
    assert chat.messages[0]["content"] not in trained and "<|tool|>" not in trained


def test_the_tool_stage_has_its_own_fingerprint() -> None:
    spec = DemoSpec()
    assert replace(spec, tool_steps=0).fingerprint() == spec.base_fingerprint()
    assert replace(spec, tool_lr=spec.tool_lr * 2).fingerprint() != spec.fingerprint()
    assert replace(spec, tool_lr=spec.tool_lr * 2).base_fingerprint() == spec.base_fingerprint()
