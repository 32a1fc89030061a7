"""Generated tool-call chats: what teaches the demo model to call a tool when asked.

Each chat offers one to three tools from a small fixed set (weather, time, currency, stock price,
e-mail, web search) and either plainly asks for one of them (the answer is a call, sometimes two,
sometimes followed by the tool's result and a final answer) or asks for something none of them
does (the answer is text or JSON). Argument values come from small fixed pools named in the asks,
so a model this size can learn to carry them into the call. Chats are OpenAI-shaped message lists
plus ``tools``; the chat template renders them exactly as the server renders requests.

Example:
    >>> import random
    >>> chat = tool_chat(random.Random(0), calls=True)
    >>> chat.messages[0]["role"], chat.messages[1]["role"]
    ('user', 'assistant')
    >>> [c["function"]["name"] in {t["function"]["name"] for t in chat.tools}
    ...  for c in chat.messages[1]["tool_calls"]]
    [True]
    >>> tool_chat(random.Random(0), calls=False).messages[1].get("tool_calls")
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CITIES = ("Paris", "Rome", "Oslo", "Berlin", "Madrid", "London", "Tokyo", "Lima", "Cairo", "Dublin",
          "Vienna", "Prague", "Lisbon", "Athens", "Seoul", "Delhi", "Boston", "Denver", "Sydney", "Toronto")
ZONES = ("UTC", "CET", "PST", "EST", "JST")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD")
SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "IBM", "INTC")
PEOPLE = ("anna", "bob", "carla", "dan", "eve", "femi", "gus", "hana")
SUBJECTS = ("lunch", "the report", "the meeting", "the budget", "holidays", "the release")
TOPICS = ("python decorators", "json schema", "binary search", "unit tests", "http caching",
          "sorting algorithms", "regular expressions", "async io")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy")

Args = dict[str, Any]


@dataclass(frozen=True)
class ToolKind:
    """One tool of the set: its definition, how a user asks for it, and its argument values."""

    name: str
    description: str
    parameters: dict[str, Any]
    draw: Callable[[random.Random], Args]
    asks: tuple[str, ...]
    result: Callable[[random.Random, Args], Args]
    answer: str


def _string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


KINDS: tuple[ToolKind, ...] = (
    ToolKind(
        "get_weather", "Weather in a city",
        _object({"city": _string(), "days": {"type": "integer"}}, ["city", "days"]),
        lambda r: {"city": r.choice(CITIES), "days": r.randint(1, 7)},
        ("What is the weather in {city} for {days} days?", "What is the weather in {city} today? ({days} days)", "What will the weather be in {city} over {days} days?",
         "Weather forecast for {city}, {days} days.", "Use get_weather for {city}, {days} days.",
         "How warm is it in {city}? Give me {days} days."),
        lambda r, a: {"city": a["city"], "temperature": r.randint(-5, 35), "conditions": r.choice(CONDITIONS)},
        "In {city} it is {temperature} degrees and {conditions}.",
    ),
    ToolKind(
        "get_time", "Time in a zone",
        _object({"zone": _string(enum=list(ZONES))}, ["zone"]),
        lambda r: {"zone": r.choice(ZONES)},
        ("What time is it in {zone}?", "Tell me the time in {zone}.", "Use get_time for {zone}.",
         "What is the current {zone} time?"),
        lambda r, a: {"zone": a["zone"], "time": f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"},
        "It is {time} {zone}.",
    ),
    ToolKind(
        "convert_currency", "Convert an amount between currencies",
        _object({"amount": {"type": "number"}, "from": _string(), "to": _string()}, ["amount", "from", "to"]),
        lambda r: {"amount": r.choice((5, 10, 20, 50, 100, 250, 1000)), "from": r.choice(CURRENCIES),
                   "to": r.choice(CURRENCIES)},
        ("Convert {amount} {from} to {to}.", "How much is {amount} {from} in {to}?",
         "Use convert_currency: {amount} {from} to {to}."),
        lambda r, a: {"amount": round(a["amount"] * r.uniform(0.5, 1.5), 2), "currency": a["to"]},
        "That is {amount} {currency}.",
    ),
    ToolKind(
        "get_stock_price", "Latest price of a stock",
        _object({"symbol": _string()}, ["symbol"]),
        lambda r: {"symbol": r.choice(SYMBOLS)},
        ("What is the stock price of {symbol}?", "How is {symbol} trading?", "Use get_stock_price for {symbol}.",
         "Price of {symbol} please."),
        lambda r, a: {"symbol": a["symbol"], "price": round(r.uniform(10, 900), 2)},
        "{symbol} is at {price}.",
    ),
    ToolKind(
        "send_email", "Send an e-mail",
        _object({"to": _string(), "subject": _string()}, ["to", "subject"]),
        lambda r: {"to": f"{r.choice(PEOPLE)}@example.com", "subject": r.choice(SUBJECTS)},
        ("Send an e-mail to {to} about {subject}.", "Email {to} about {subject}.",
         "Use send_email to write to {to} about {subject}."),
        lambda r, a: {"sent": True, "to": a["to"]},
        "Sent to {to}.",
    ),
    ToolKind(
        "search_web", "Search the web",
        _object({"query": _string()}, ["query"]),
        lambda r: {"query": r.choice(TOPICS)},
        ("Search the web for {query}.", "Look up {query} online.", "Use search_web to find {query}."),
        lambda r, a: {"results": [f"https://example.com/{a['query'].replace(' ', '-')}"]},
        "I found a page about it: {first}.",
    ),
)
BY_NAME = {kind.name: kind for kind in KINDS}

_PLAIN_ASKS = (
    ("Hello!", "Hello! How can I help?"),
    ("Thanks, that is all.", "You are welcome."),
    ("Who are you?", "I am a small assistant."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("What is 7 + 5?", "7 + 5 = 12."),
    ("Say hi to the team.", "Hi team!"),
)
_JSON_ASKS = ("Return a JSON object.", "Answer in JSON.", "Give me the data as JSON.")
_CODE_ASKS = ("Write some Python code.", "Show me a Python function.", "Write Python.",
              "Continue this Python module.")


@dataclass(frozen=True)
class ToolChat:
    """A chat (OpenAI messages) and the tools it offers; ``calls`` names what the last answer calls."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    calls: tuple[tuple[str, str], ...]  # (name, arguments as JSON) of the chat's first answer


def tool_definition(kind: ToolKind) -> dict[str, Any]:
    """The OpenAI ``tools`` entry for ``kind``."""
    return {"type": "function", "function": {"name": kind.name, "description": kind.description,
                                             "parameters": kind.parameters}}


def _ask(rng: random.Random, kind: ToolKind, args: Args) -> str:
    return rng.choice(kind.asks).format(**args)


def _call(kind: ToolKind, args: Args, index: int) -> dict[str, Any]:
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": kind.name, "arguments": json.dumps(args)}}


def _answer(kind: ToolKind, result: Args) -> str:
    values = {**result, "first": (result.get("results") or [""])[0]}
    return kind.answer.format(**values)


def tool_chat(rng: random.Random, calls: bool, json_answers: list[str] | None = None,
              code_answers: list[str] | None = None) -> ToolChat:
    """One generated chat; with ``calls`` it asks for a tool (sometimes two), else for something else
    (JSON, Python or a short reply, from ``json_answers``, ``code_answers`` and canned replies)."""
    offered = rng.sample(KINDS, rng.randint(1, 3))
    tools = [tool_definition(k) for k in offered]
    if not calls:
        pick = rng.random()
        if json_answers and pick < 0.4:
            user, answer = rng.choice(_JSON_ASKS), rng.choice(json_answers)
        elif code_answers and pick < 0.7:
            user, answer = rng.choice(_CODE_ASKS), rng.choice(code_answers)
        else:
            user, answer = rng.choice(_PLAIN_ASKS)
        return ToolChat([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tools, ())
    wanted = [rng.choice(offered)]
    if len(offered) > 1 and rng.random() < 0.12:
        wanted.append(rng.choice([k for k in offered if k is not wanted[0]]))
    drawn = [(kind, kind.draw(rng)) for kind in wanted]
    user = " And ".join(_ask(rng, kind, args) for kind, args in drawn)
    tool_calls = [_call(kind, args, i) for i, (kind, args) in enumerate(drawn)]
    messages: list[dict[str, Any]] = [{"role": "user", "content": user},
                                      {"role": "assistant", "content": None, "tool_calls": tool_calls}]
    if rng.random() < 0.3:
        answers = []
        for call, (kind, args) in zip(tool_calls, drawn):
            result = kind.result(rng, args)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
            answers.append(_answer(kind, result))
        messages.append({"role": "assistant", "content": " ".join(answers)})
    called = tuple((c["function"]["name"], c["function"]["arguments"]) for c in tool_calls)
    return ToolChat(messages, tools, called)


def tool_chats(n: int, seed: int, call_share: float, json_answers: list[str] | None = None,
               code_answers: list[str] | None = None) -> list[ToolChat]:
    """``n`` chats from ``seed``, a ``call_share`` of them asking for a call."""
    rng = random.Random(seed)
    return [tool_chat(rng, calls=rng.random() < call_share, json_answers=json_answers,
                      code_answers=code_answers) for _ in range(n)]
