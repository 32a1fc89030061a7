"""The body a request is forwarded with: parsed once, every edit applied to it, serialised once.

The gateway edits some bodies on their way to an engine (legacy ``guided_*`` fields, the strict
keyword, a capped ``max_tokens``, ``vllm_xargs.spec_k``). The edits work on the object the
framework already parsed, each returning a changed copy (the parsed object is never mutated), and
the result is serialised once, when it is sent. A body no edit changes goes on as the client's own
bytes; a ``spec_k`` added to such a body is spliced into the bytes without serialising them.
Readers such as the prompt token counter read :attr:`ForwardBody.data` instead of parsing again.

Example:
    >>> body = ForwardBody(b'{"model": "m"}', {"model": "m"})
    >>> body.encode()
    b'{"model": "m"}'
    >>> body.set_spec_k(2)
    True
    >>> body.encode()
    b'{"vllm_xargs":{"spec_k":2},"model": "m"}'
    >>> body.set("max_tokens", 5)
    >>> body.encode()
    b'{"model": "m", "vllm_xargs": {"spec_k": 2}, "max_tokens": 5}'
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from specserve.gateway.spec_io import with_spec_k

Edit = Callable[[dict[str, Any]], dict[str, Any]]
"""An edit: the body itself when it changes nothing, else a changed copy."""


class ForwardBody:
    """One request's body on its way to an engine (:meth:`encode` gives the bytes to send)."""

    def __init__(self, raw: bytes, data: dict[str, Any]) -> None:
        self.data = data
        """The body as it stands after the edits so far (read it, do not mutate it)."""
        self._bytes: bytes | None = raw
        """``data`` as bytes; ``None`` after an edit, until :meth:`encode`."""

    def apply(self, edit: Edit) -> None:
        """Apply ``edit`` to the body."""
        changed = edit(self.data)
        if changed is not self.data:
            self.data = changed
            self._bytes = None

    def set(self, name: str, value: Any) -> None:
        """Set the top-level field ``name``."""
        self.apply(lambda data: {**data, name: value})

    def set_spec_k(self, k: int) -> bool:
        """Set ``vllm_xargs.spec_k``; ``False`` (body unchanged) when ``vllm_xargs`` is not an object."""
        xargs = self.data.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return False
        data = {**self.data, "vllm_xargs": {**(xargs or {}), "spec_k": k}}
        if "vllm_xargs" not in self.data and self._bytes is not None:
            spliced = with_spec_k(self._bytes, k, has_xargs=False)
            if spliced is not None:
                self.data, self._bytes = data, spliced
                return True
        self.apply(lambda _: data)
        return True

    def encode(self) -> bytes:
        """The bytes to send: the client's own when no edit changed them, else the edited body,
        serialised once."""
        if self._bytes is None:
            self._bytes = json.dumps(self.data).encode()
        return self._bytes
