"""The demo model: a small Llama-architecture model trained here, with its own tokenizer.

:func:`demo_model_dir` returns a directory vLLM can load. It prefers the artifact shipped in the
package (``artifact/``), then the user cache, and trains one (minutes on 2 cores) only when
neither matches the current recipe's fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from specserve.demo.spec import DemoSpec

logger = logging.getLogger(__name__)

ARTIFACT_DIR = Path(__file__).parent / "artifact"


def cache_root() -> Path:
    base = os.environ.get("SPECSERVE_CACHE") or os.path.join(Path.home(), ".cache", "specserve")
    return Path(base)


def _matches(path: Path, fingerprint: str) -> bool:
    record = path / "record.json"
    if not (path / "config.json").is_file() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def find_demo_model(spec: DemoSpec | None = None) -> Path | None:
    """The shipped or cached demo model for ``spec``, or None if it must be built."""
    spec = spec or DemoSpec()
    fp = spec.fingerprint()
    for candidate in (ARTIFACT_DIR, cache_root() / "demo-model" / fp):
        if _matches(candidate, fp):
            return candidate
    return None


def demo_model_dir(spec: DemoSpec | None = None, build: bool = True, progress: bool = True) -> Path:
    """Directory of the demo model; builds it into the cache if missing and ``build`` is true."""
    spec = spec or DemoSpec()
    found = find_demo_model(spec)
    if found is not None:
        return found
    if not build:
        raise FileNotFoundError(f"demo model {spec.fingerprint()} not built; run `specserve demo-model`")
    from specserve.demo.build import build as _build

    out = cache_root() / "demo-model" / spec.fingerprint()
    logger.info("building the demo model", extra={"fields": {"dir": str(out)}})
    _build(out, spec, progress=progress)
    return out
