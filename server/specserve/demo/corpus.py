"""The demo model's training corpus: the standard library's ``.py`` sources plus generated JSON.

Both exist on every machine with Python, so the corpus needs no download. Held-out files are
chosen by a hash of their relative path (stable across machines), and recorded.

Example:
    >>> is_heldout("json/decoder.py", modulus=40) == is_heldout("json/decoder.py", modulus=40)
    True
    >>> doc = json_document(random.Random(0))
    >>> isinstance(json.loads(doc), (dict, list))
    True
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, modulus: int) -> bool:
    """A file is held out when the first 8 hex digits of sha1(relpath) are 0 modulo ``modulus``."""
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % modulus == 0


def python_sources(root: Path | None = None) -> Iterator[SourceFile]:
    """Every readable ``.py`` file under the stdlib, sorted by relative path (deterministic)."""
    root = root or stdlib_dir()
    paths = sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.parts))
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield SourceFile(path.relative_to(root).as_posix(), text)


# --- generated JSON -------------------------------------------------------------------------

_WORDS = (
    "alpha beta gamma delta status name title value count items user order product price "
    "amount currency email address city country zip phone id created updated enabled tags "
    "description type kind version level score rating color size weight height width url "
    "path method code message error result data config timeout retries region owner team "
    "project label category quantity total discount tax date time year month day active"
).split()
_FIRST = "Ada Alan Grace Linus Guido Barbara Ken Dennis Margaret Edsger Donald Frances".split()
_CITIES = "Paris Berlin Tokyo Lima Oslo Cairo Austin Denver Madrid Seoul Lagos Quito".split()


def _key(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    if rng.random() < 0.3:
        word = f"{word}_{rng.choice(_WORDS)}"
    if rng.random() < 0.15:
        parts = word.split("_")
        word = parts[0] + "".join(p.title() for p in parts[1:])
    return word


def _scalar(rng: random.Random, key: str) -> object:
    r = rng.random()
    if "email" in key:
        return f"{rng.choice(_FIRST).lower()}.{rng.randint(1, 99)}@example.com"
    if "city" in key:
        return rng.choice(_CITIES)
    if "name" in key or "owner" in key or "user" in key:
        return f"{rng.choice(_FIRST)} {rng.choice(_FIRST)}son"
    if "date" in key or "created" in key or "updated" in key:
        return f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if "id" in key:
        return rng.randint(1, 100000)
    if r < 0.25:
        return rng.randint(-50, 5000)
    if r < 0.4:
        return round(rng.uniform(0, 1000), rng.choice((1, 2, 3)))
    if r < 0.55:
        return rng.random() < 0.5
    if r < 0.6:
        return None
    n = rng.randint(1, 4)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _value(rng: random.Random, key: str, depth: int) -> object:
    r = rng.random()
    if depth < 3 and r < 0.2:
        return _object(rng, depth + 1)
    if depth < 3 and r < 0.32:
        n = rng.randint(0, 4)
        if rng.random() < 0.5:
            return [_object(rng, depth + 1) for _ in range(n)]
        return [_scalar(rng, key) for _ in range(n)]
    return _scalar(rng, key)


def _object(rng: random.Random, depth: int = 0) -> dict[str, object]:
    out: dict[str, object] = {}
    for _ in range(rng.randint(1, 6 if depth else 8)):
        key = _key(rng)
        out[key] = _value(rng, key, depth)
    return out


def json_document(rng: random.Random) -> str:
    """One JSON document: an object or an array of objects, compact or indented."""
    value: object = _object(rng) if rng.random() < 0.8 else [_object(rng, 1) for _ in range(3)]
    style = rng.random()
    if style < 0.45:
        return json.dumps(value, indent=2)
    if style < 0.65:
        return json.dumps(value, indent=4)
    if style < 0.85:
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def json_documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [json_document(rng) for _ in range(n)]


# --- chat wrapping ----------------------------------------------------------------------------

_JSON_ASKS = (
    "Return a JSON object.",
    "Answer in JSON.",
    "Give me the data as JSON.",
    "Produce a JSON document with the fields you think fit.",
    "Respond with valid JSON only.",
)
_CODE_ASKS = (
    "Write some Python code.",
    "Continue this Python module.",
    "Show me a Python function.",
    "Write Python.",
)


def chat_wrap(user: str, assistant: str) -> str:
    """Format one exchange with the demo model's chat template (see spec.CHAT_TEMPLATE)."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def maybe_chat(text: str, kind: str, rng: random.Random, fraction: float) -> str:
    if rng.random() >= fraction:
        return text
    asks = _JSON_ASKS if kind == "json" else _CODE_ASKS
    if kind == "code":
        text = text[: rng.randint(400, 1600)]
    return chat_wrap(rng.choice(asks), text)
