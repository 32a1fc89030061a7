"""The soak's request kinds: what each sends and what counts as a correct answer.

Every kind is one async call that sends one request through the gateway and returns an
:class:`Outcome` (a short label plus, when the answer was wrong, why). Greedy kinds are compared
with a reference taken from an engine without speculation; structured outputs are validated
against their schema; malformed requests must get an OpenAI-shaped 4xx.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema

COMPLETION_PROMPTS = (
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n",
    "import os\nimport sys\nimport json\nimport os\nimport sys\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\nclass",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "with open(path) as f:\n    for line in f:\n",
)
CHAT_PROMPTS = (
    "def f(x):\n    return x\n\ndef f(x):\n    return x",
    "Write a function that sorts a list.",
    "import json\n\ndata = json.loads(text)\n",
)
SCHEMAS: tuple[dict[str, Any], ...] = (
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "ok": {"type": "boolean"},
                                      "color": {"enum": ["red", "green", "blue"]}},
     "required": ["name", "ok", "color"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3},
                                      "kind": {"enum": ["x", "y"]}},
     "required": ["tags", "kind"], "additionalProperties": False},
)
ERROR_KEYS = frozenset({"message", "type", "param", "code"})
GREEDY_TOKENS = 48
SCHEMA_TOKENS = 160
DISCONNECT_TOKENS = 400


@dataclass(frozen=True)
class Outcome:
    """``label`` is ``ok`` or what went wrong; ``status`` the HTTP status (0 when none came)."""

    label: str
    status: int
    detail: str = ""

    @property
    def server_error(self) -> bool:
        """A 5xx answer, or a stream that ended with an error event."""
        return self.status >= 500 or self.label == "stream_error"


Reference = dict[str, str]
"""Greedy text by request key (``completion:<i>`` / ``chat:<i>``)."""


def _completion_body(model: str, i: int) -> dict[str, Any]:
    return {"model": model, "prompt": COMPLETION_PROMPTS[i], "max_tokens": GREEDY_TOKENS, "temperature": 0}


def _chat_body(model: str, i: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": CHAT_PROMPTS[i]}],
            "max_tokens": GREEDY_TOKENS, "temperature": 0}


def reference_requests(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(key, path, body)`` of every greedy request the soak compares with the reference."""
    out = [(f"completion:{i}", "/v1/completions", _completion_body(model, i)) for i in range(len(COMPLETION_PROMPTS))]
    out += [(f"chat:{i}", "/v1/chat/completions", _chat_body(model, i)) for i in range(len(CHAT_PROMPTS))]
    return out


def answer_text(path: str, data: dict[str, Any]) -> str:
    """The first choice's text of a non-streaming answer.

    Example:
        >>> answer_text("/v1/completions", {"choices": [{"text": "x"}]})
        'x'
        >>> answer_text("/v1/chat/completions", {"choices": [{"message": {"content": "y"}}]})
        'y'
    """
    choice = data["choices"][0]
    return str(choice["text"]) if path == "/v1/completions" else str(choice["message"]["content"] or "")


def _is_openai_error(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and ERROR_KEYS <= set(data["error"])


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                  stop_after: int | None = None) -> tuple[int, dict[int, str], dict[int, str | None], Any]:
    """Send a streaming request; ``(status, text by choice, finish reason by choice, error)``.

    ``stop_after``: close the connection after that many content chunks (a client going away).
    """
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    chunks = 0
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raw = await response.aread()
            try:
                return response.status_code, texts, finish, json.loads(raw)
            except ValueError:
                return response.status_code, texts, finish, raw.decode(errors="replace")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return response.status_code, texts, finish, event
            for choice in event.get("choices") or []:
                index = int(choice.get("index", 0))
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                texts[index] = texts.get(index, "") + (piece or "")
                finish[index] = choice.get("finish_reason") or finish.get(index)
                chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return response.status_code, texts, finish, None
    return 200, texts, finish, None


def _failed(status: int, answer: Any) -> Outcome:
    if status >= 500:
        return Outcome("server_error", status, str(answer)[:300])
    return Outcome("unexpected_status", status, str(answer)[:300])


class Traffic:
    """The request kinds, drawn by a seeded generator; ``kinds`` maps name to (weight, call)."""

    def __init__(self, model: str, reference: Reference, rng: random.Random) -> None:
        self.model = model
        self.reference = reference
        self.rng = rng
        self.kinds: dict[str, tuple[int, Callable[[httpx.AsyncClient], Awaitable[Outcome]]]] = {
            "greedy_completion": (3, self.greedy_completion),
            "greedy_completion_stream": (2, self.greedy_completion_stream),
            "greedy_chat": (2, self.greedy_chat),
            "greedy_chat_stream": (2, self.greedy_chat_stream),
            "json_schema": (3, self.json_schema),
            "sampled_n2": (2, self.sampled),
            "sampled_n2_stream": (1, self.sampled_stream),
            "disconnect": (1, self.disconnect),
            "bad_request": (1, self.bad_request),
        }

        self._deck: list[str] = []

    def draw(self) -> str:
        """The next kind: dealt from a shuffled deck holding each kind ``weight`` times, so every
        ``deck_size`` requests hold each kind in proportion (and every kind appears)."""
        if not self._deck:
            self._deck = [name for name, (weight, _) in self.kinds.items() for _ in range(weight)]
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    @property
    def deck_size(self) -> int:
        return sum(weight for weight, _ in self.kinds.values())

    def _greedy_check(self, key: str, text: str) -> Outcome:
        expected = self.reference[key]
        if text != expected:
            return Outcome("greedy_mismatch", 200, f"{key}: got {text[:80]!r}, reference {expected[:80]!r}")
        return Outcome("ok", 200)

    async def _greedy(self, client: httpx.AsyncClient, kind: str, stream: bool) -> Outcome:
        if kind == "completion":
            i = self.rng.randrange(len(COMPLETION_PROMPTS))
            path, body = "/v1/completions", _completion_body(self.model, i)
        else:
            i = self.rng.randrange(len(CHAT_PROMPTS))
            path, body = "/v1/chat/completions", _chat_body(self.model, i)
        key = f"{kind}:{i}"
        if not stream:
            status, answer = await _post(client, path, body)
            if status != 200:
                return _failed(status, answer)
            return self._greedy_check(key, answer_text(path, answer))
        status, texts, _, error = await _stream(client, path, body)
        if error is not None:
            return Outcome("stream_error", status, str(error)[:300]) if status == 200 else _failed(status, error)
        return self._greedy_check(key, texts.get(0, ""))

    async def greedy_completion(self, client: httpx.AsyncClient) -> Outcome:
        return await self._greedy(client, "completion", stream=False)

    async def greedy_completion_stream(self, client: httpx.AsyncClient) -> Outcome:
        return await self._greedy(client, "completion", stream=True)

    async def greedy_chat(self, client: httpx.AsyncClient) -> Outcome:
        return await self._greedy(client, "chat", stream=False)

    async def greedy_chat_stream(self, client: httpx.AsyncClient) -> Outcome:
        return await self._greedy(client, "chat", stream=True)

    async def json_schema(self, client: httpx.AsyncClient) -> Outcome:
        """A ``response_format`` json_schema chat request; the content must parse and validate."""
        schema = SCHEMAS[self.rng.randrange(len(SCHEMAS))]
        body = {"model": self.model, "max_tokens": SCHEMA_TOKENS,
                "temperature": self.rng.choice([0.0, 0.7]), "seed": self.rng.randrange(1 << 30),
                "messages": [{"role": "user", "content": "Describe one item as JSON."}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "item", "schema": schema, "strict": True}}}
        status, answer = await _post(client, "/v1/chat/completions", body)
        if status != 200:
            return _failed(status, answer)
        content = answer_text("/v1/chat/completions", answer)
        try:
            jsonschema.validate(json.loads(content), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            finish = answer["choices"][0].get("finish_reason")
            return Outcome("invalid_structured_output", 200, f"finish {finish}: {content[:120]!r}: {exc}"[:300])
        return Outcome("ok", 200)

    def _sampled_body(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": COMPLETION_PROMPTS[self.rng.randrange(len(COMPLETION_PROMPTS))],
                "max_tokens": 32, "temperature": 0.8, "top_p": 0.95, "n": 2,
                "seed": self.rng.randrange(1 << 30)}

    async def sampled(self, client: httpx.AsyncClient) -> Outcome:
        """Seeded sampling at temperature > 0 with ``n=2``: two choices, usage counts both."""
        status, answer = await _post(client, "/v1/completions", self._sampled_body())
        if status != 200:
            return _failed(status, answer)
        choices = answer.get("choices") or []
        if sorted(c.get("index") for c in choices) != [0, 1] or not all(c.get("finish_reason") for c in choices):
            return Outcome("bad_answer", status, f"choices {choices!r}"[:300])
        return Outcome("ok", 200)

    async def sampled_stream(self, client: httpx.AsyncClient) -> Outcome:
        status, _, finish, error = await _stream(client, "/v1/completions", self._sampled_body())
        if error is not None:
            return Outcome("stream_error", status, str(error)[:300]) if status == 200 else _failed(status, error)
        if sorted(finish) != [0, 1] or not all(finish.values()):
            return Outcome("bad_answer", status, f"finish reasons {finish}")
        return Outcome("ok", 200)

    async def disconnect(self, client: httpx.AsyncClient) -> Outcome:
        """A long stream the client closes after a few chunks (the engine must free the slot)."""
        body = {"model": self.model, "prompt": COMPLETION_PROMPTS[self.rng.randrange(len(COMPLETION_PROMPTS))],
                "max_tokens": DISCONNECT_TOKENS, "temperature": 0, "ignore_eos": True}
        status, texts, _, error = await _stream(client, "/v1/completions", body, stop_after=self.rng.randint(1, 8))
        if error is not None:
            return Outcome("stream_error", status, str(error)[:300]) if status == 200 else _failed(status, error)
        return Outcome("ok", 200) if texts else Outcome("bad_answer", status, "no chunk before the disconnect")

    async def bad_request(self, client: httpx.AsyncClient) -> Outcome:
        """A malformed request: it must get a 4xx with an OpenAI error object, never a 5xx."""
        cases: list[tuple[str, Any]] = [
            ("/v1/completions", {"model": self.model, "prompt": "x", "max_tokens": -1}),
            ("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 4}),
            ("/v1/chat/completions", {"model": self.model, "messages": "not a list"}),
            ("/v1/chat/completions", {"model": self.model, "messages": [{"role": "user", "content": "x"}],
                                      "temperature": "hot"}),
            ("/v1/completions", {"model": self.model, "prompt": "x " * 2000, "max_tokens": 4}),
            ("/v1/completions", "{not json"),
        ]
        path, body = cases[self.rng.randrange(len(cases))]
        if isinstance(body, str):
            response = await client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post(path, json=body)
        try:
            answer: Any = response.json()
        except ValueError:
            answer = response.text
        if 400 <= response.status_code < 500 and _is_openai_error(answer):
            return Outcome("ok", response.status_code)
        if response.status_code >= 500:
            return Outcome("server_error", response.status_code, str(answer)[:300])
        return Outcome("bad_error_shape", response.status_code, str(answer)[:300])


__all__ = ["Outcome", "Reference", "Traffic", "answer_text", "reference_requests"]
