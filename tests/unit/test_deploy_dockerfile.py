"""The Dockerfile (parsed: no Docker engine here), .dockerignore and the container entry point."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"

Stage = list[tuple[str, str]]  # (INSTRUCTION, arguments)


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Instructions per stage name, continuation lines joined, comments dropped.

    >>> parse_dockerfile("FROM a AS one\\nRUN x \\\\\\n  && y\\n")["one"]
    [('FROM', 'a AS one'), ('RUN', 'x && y')]
    """
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1].strip() + " "
            continue
        logical += line
        op, _, args = logical.partition(" ")
        logical = ""
        op = op.upper()
        if op == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = []
            stages[m.group(1) if m else f"stage{len(stages)}"] = current
        if current is not None:
            current.append((op, args.strip()))
    return stages


def base_of(stage: Stage) -> str:
    return stage[0][1].split()[0]


def lineage(stages: dict[str, Stage], name: str) -> list[str]:
    chain = [name]
    while base_of(stages[chain[-1]]) in stages:
        chain.append(base_of(stages[chain[-1]]))
    return chain


def inherited(stages: dict[str, Stage], name: str, op: str) -> list[str]:
    """Arguments of `op` in the stage and the stages it is built FROM (nearest first)."""
    return [args for s in lineage(stages, name) for o, args in reversed(stages[s]) if o == op]


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_targets_exist_and_plain_build_gives_the_cpu_engine(stages: dict[str, Stage]) -> None:
    assert {"gateway", "engine-cpu", "engine-gpu"} <= set(stages)
    assert list(stages)[-1] == "engine-cpu"


@pytest.mark.parametrize("target", ["gateway", "engine-cpu", "engine-gpu"])
def test_images_run_as_a_non_root_user_with_a_healthcheck(stages: dict[str, Stage], target: str) -> None:
    users = inherited(stages, target, "USER")
    assert users and users[0].split(":")[0] not in ("root", "0")
    checks = inherited(stages, target, "HEALTHCHECK")
    assert checks and checks[0].split()[-1] != "NONE" and "CMD" in checks[0]
    assert "SPECSERVE_HEALTH_URL" in checks[0]
    env = " ".join(inherited(stages, target, "ENV"))
    assert re.search(r"SPECSERVE_HEALTH_URL=http://127\.0\.0\.1:\d+/health", env)
    entry = inherited(stages, target, "ENTRYPOINT")
    assert entry and json.loads(entry[0]) == ["specserve-entrypoint"]


@pytest.mark.parametrize(("target", "flavor"), [("engine-cpu", "cpu"), ("engine-gpu", "gpu")])
def test_engine_images_install_with_the_setup_script(stages: dict[str, Stage], target: str, flavor: str) -> None:
    runs = [a for a in inherited(stages, target, "RUN") if "setup.sh" in a]
    assert runs == [f"SPECSERVE_FLAVOR={flavor} bash scripts/setup.sh && chown -R 10001:10001 /home/specserve"]
    # No second, hand-typed dependency list.
    assert not any(re.search(r"pip install .*(vllm|torch|-r )", a) for a in inherited(stages, target, "RUN"))
    copies = " ".join(inherited(stages, target, "COPY"))
    for needed in ("requirements", "scripts/setup.sh", "server", "plugins", "pyproject.toml"):
        assert needed in copies


def test_gateway_image_installs_only_the_base_package(stages: dict[str, Stage]) -> None:
    runs = inherited(stages, "gateway", "RUN")
    pip = [a for a in runs if "pip install" in a]
    assert len(pip) == 1
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", pip[0])  # no [cpu]/[gpu] extras
    assert "requirements" not in pip[0] and "setup.sh" not in " ".join(runs)
    assert "engine-base" not in lineage(stages, "gateway")


def test_setup_script_supports_the_image_layout() -> None:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    for var in ("SPECSERVE_FLAVOR", "SPECSERVE_VENV", "SPECSERVE_VENV_LINK"):
        assert var in text
    for flavor in ("cpu", "gpu"):
        assert (ROOT / "requirements" / f"{flavor}.txt").is_file()


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the simple patterns used here: last match wins, `!` re-includes."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest(stages: dict[str, Stage]) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = set()
    for stage in stages.values():
        for op, args in stage:
            if op == "COPY":
                words = [w for w in args.split() if not w.startswith("--")]
                sources.update(w for w in words[:-1] if "*" not in w)
    assert sources >= {"pyproject.toml", "server", "plugins", "requirements", "scripts/setup.sh",
                       "deploy/docker/entrypoint.sh"}
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), src
    assert not _ignored("server/specserve/cli.py", patterns)
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "helm/specserve/Chart.yaml",
                    "server/specserve/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(dropped, patterns), dropped


STUB = """#!/bin/sh
if [ "$1 $2" = "demo-model --print-path" ]; then echo /demo/model; exit 0; fi
printf "%s\\n" "$(basename "$0")" "$@"
"""


def _entrypoint(tmp: Path, *args: str, env: dict[str, str]) -> list[str]:
    """Run the entry point with `specserve` and `python` stubs that print their command line."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("specserve", "python", "echo-args"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_entrypoint_modes(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    spec = '{"method": "ngram", "num_speculative_tokens": 4}'
    engine = _entrypoint(tmp_path, "engine", "--enforce-eager", env={"SPECSERVE_SPECULATIVE_CONFIG": spec,
                                                          "SPECSERVE_ENGINE_PORT": "8100"})
    assert engine[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert engine[engine.index("--model") + 1] == "/demo/model"
    assert engine[engine.index("--port") + 1] == "8100"
    assert engine[engine.index("--speculative-config") + 1] == spec
    assert engine[engine.index("--served-model-name") + 1] == "specserve-demo"
    assert engine[-1] == "--enforce-eager"
    named = _entrypoint(tmp_path, "engine", env={"SPECSERVE_MODEL": "/models/m", "SPECSERVE_SERVED_MODEL_NAME": "m"})
    assert named[named.index("--model") + 1] == "/models/m"
    assert named[named.index("--served-model-name") + 1] == "m"
    assert "--speculative-config" not in named
    assert "--model" not in _entrypoint(tmp_path, env={})  # serve picks the demo model itself
    serve = _entrypoint(tmp_path, env={"SPECSERVE_MODEL": "/models/x"})
    assert serve[:2] == ["specserve", "serve"]
    assert serve[serve.index("--model") + 1] == "/models/x"
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    assert "--speculative-config" not in serve
    gateway = _entrypoint(tmp_path, "gateway", "--replica=http://engine:8100", env={"SPECSERVE_PORT": "9000"})
    assert gateway[:2] == ["specserve", "gateway"] and gateway[-1] == "--replica=http://engine:8100"
    assert gateway[gateway.index("--port") + 1] == "9000"
    assert _entrypoint(tmp_path, "echo-args", "hi", env={}) == ["echo-args", "hi"]


ENV_STUB = """#!/bin/sh
printf "%s\\n" "$(basename "$0")" "API_KEYS=${SPECSERVE_API_KEYS:-}" "ENGINE_KEY=${SPECSERVE_ENGINE_API_KEY:-}" "$@"
"""


def test_entrypoint_reads_keys_from_secret_files_and_runs_headless_workers(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("specserve", "python", "vllm"):
        (bin_dir / name).write_text(ENV_STUB if name != "specserve" else STUB.replace("/demo/model", "/demo"))
        (bin_dir / name).chmod(0o755)
    keys, engine_key = tmp_path / "api-keys", tmp_path / "engine-key"
    keys.write_text("sk-one\r\n\nsk-two\n")
    engine_key.write_text("ek-secret\n")

    def run(*args: str, **env: str) -> list[str]:
        proc = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    files = {"SPECSERVE_API_KEYS_FILE": str(keys), "SPECSERVE_ENGINE_API_KEY_FILE": str(engine_key)}
    engine = run("engine", **files)
    assert "API_KEYS=sk-one,sk-two" in engine and "ENGINE_KEY=ek-secret" in engine
    assert not [a for a in engine if "sk-one" in a and not a.startswith("API_KEYS=")]  # never an argument
    given = run("engine", SPECSERVE_ENGINE_API_KEY="from-env", **files)
    assert "ENGINE_KEY=from-env" in given  # an explicit variable wins over the file
    worker = run("engine", "--nnodes=2", SPECSERVE_ENGINE_HEADLESS="1", SPECSERVE_MODEL="/models/m")
    assert worker[0] == "vllm" and worker[3:6] == ["serve", "/models/m", "--headless"]
    assert "--port" not in worker and worker[-1] == "--nnodes=2"


def test_gpu_image_can_jit_triton_kernels(stages: dict[str, Stage]) -> None:
    """Triton compiles a C launcher on first use: a C compiler, libc headers and Python.h (checked at
    build time); the CPU image does not need them."""
    gpu_runs = " ".join(inherited(stages, "engine-gpu", "RUN"))
    assert re.search(r"apt-get install [^&]*\bgcc\b", gpu_runs) and "libc6-dev" in gpu_runs
    assert "Python.h" in gpu_runs
    env = " ".join(inherited(stages, "engine-gpu", "ENV"))
    assert "CC=gcc" in env and "TRITON_CACHE_DIR=/home/specserve/.cache/" in env
    assert "gcc" not in " ".join(inherited(stages, "engine-cpu", "RUN"))
