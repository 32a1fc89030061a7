"""One schema pre-check (and its compile workers) for the unit tests that call it directly."""

from __future__ import annotations

from specserve.structured.precheck import SchemaPrecheck

SHARED = SchemaPrecheck()
precheck = SHARED.precheck
aprecheck = SHARED.aprecheck
