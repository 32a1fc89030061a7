"""The command lines the compose files and the Helm chart give the containers, followed through
deploy/docker/entrypoint.sh, are accepted by the real argument parsers: specserve's for the gateway
and vLLM's OpenAI server's for the engine (so a typo in a flag fails here, not in a cluster)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.installed_tools import tool

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
CHART = ROOT / "helm" / "specserve"
STUB = """#!/bin/sh
if [ "$1 $2" = "demo-model --print-path" ]; then echo /opt/demo; exit 0; fi
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@"
"""


def entrypoint_argv(tmp: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """The command the entry point would exec, with `specserve` and `python` as recording stubs."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("specserve", "python", "vllm"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def compose_services(*files: str) -> dict[str, Any]:
    cmd = shlex.split(tool("compose"))
    for f in files:
        cmd += ["-f", str(ROOT / "deploy" / f)]
    out = subprocess.run([*cmd, "config"], check=True, capture_output=True, text=True, timeout=120,
                         cwd=ROOT / "deploy", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())})
    return yaml.safe_load(out.stdout)["services"]


def helm_containers(*values: str) -> dict[str, dict[str, Any]]:
    extra = [a for v in values for a in ("-f", str(CHART / v))]
    out = subprocess.run([tool("helm"), "template", "rel", str(CHART), *extra], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    containers = {}
    for doc in yaml.safe_load_all(out):
        if doc and doc["kind"] == "Deployment":
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            containers[c["name"]] = c
    return containers


def helm_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every engine and gateway command line of the deployment files, as the containers run them."""
    tmp = tmp_path_factory.mktemp("entry")
    found: dict[str, list[str]] = {}
    for label, files in {"compose-cpu": ["docker-compose.yml"],
                         "compose-gpu": ["docker-compose.yml", "docker-compose.gpu.yml"]}.items():
        services = compose_services(*files)
        for name in ("engine", "gateway"):
            svc = services[name]
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None}
            for key, value in list(env.items()):  # the mounted compose secrets, as files here
                if key.endswith("_FILE") and value.startswith("/run/secrets/"):
                    secret = tmp / value.rsplit("/", 1)[-1]
                    secret.write_text("test-key\n")
                    env[key] = str(secret)
            found[f"{label}/{name}"] = entrypoint_argv(tmp, list(svc["command"]), env)
    for label, values in {"helm-default": [], "helm-gpu": ["values-gpu.yaml"],
                          "helm-minimal": ["values-minimal.yaml"]}.items():
        for name, container in helm_containers(*values).items():
            found[f"{label}/{name}"] = entrypoint_argv(tmp, container["args"], helm_env(container))
    return found


def test_gateway_commands_parse_with_the_specserve_cli(launches: dict[str, list[str]]) -> None:
    from specserve.cli import build_parser

    gateways = {k: v for k, v in launches.items() if k.endswith("/gateway")}
    assert len(gateways) == 5
    for label, argv in gateways.items():
        assert argv[:2] == ["specserve", "gateway"], label
        args = build_parser().parse_args(argv[1:])
        assert args.host == "0.0.0.0" and args.port == 8000, label
        assert args.replica or args.replicas_dns, label


def test_engine_commands_parse_with_the_vllm_server_parser(launches: dict[str, list[str]]) -> None:
    engines = {k: v for k, v in launches.items() if k.endswith("/engine")}
    assert len(engines) == 5
    for label, argv in engines.items():
        assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], label
    # One child process imports vLLM once and parses every command line with its server parser.
    script = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "out = {}\n"
        "for label, argv in json.loads(sys.stdin.read()).items():\n"
        "    a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)\n"
        "    spec = a.speculative_config\n"
        "    out[label] = {'model': a.model, 'port': a.port, 'max_model_len': a.max_model_len,\n"
        "                  'served': a.served_model_name, 'spec': spec if spec is None else dict(spec),\n"
        "                  'spec_metrics': a.per_request_spec_decode_metrics}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps({k: v[3:] for k, v in engines.items()}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(parsed) == set(engines)
    for label, a in parsed.items():
        assert a["port"] == 8100, label
        assert a["max_model_len"] >= 512, label
        # a speculative engine reports per-request drafts per step (the gateway learns from them)
        assert a["spec_metrics"] == ("none" if a["spec"] is None else "detailed"), label
    assert parsed["compose-cpu/engine"]["model"] == "/opt/demo"
    assert parsed["compose-cpu/engine"]["served"] == ["specserve-demo"]
    assert parsed["compose-cpu/engine"]["spec"]["method"] == "ngram"
    assert parsed["helm-default/engine"]["spec"]["method"] == "ngram"
    assert parsed["helm-minimal/engine"]["spec"] is None
    assert parsed["helm-gpu/engine"]["model"] == "/models"


def test_multi_node_leader_and_worker_commands_parse_with_the_vllm_server_parser(tmp_path: Path) -> None:
    """The LeaderWorkerSet's pods, with the $(LWS_*) references the kubelet expands filled in."""
    out = subprocess.run([tool("helm"), "template", "rel", str(CHART), "-f", str(CHART / "values-gpu.yaml"),
                          "--api-versions", "leaderworkerset.x-k8s.io/v1", "--set", "engine.gpus=8",
                          "--set", "engine.multiNode.enabled=true", "--set", "engine.multiNode.nodes=2"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    (lws,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "LeaderWorkerSet"]
    leader = "rel-specserve-engine-0.rel-specserve-engine.llm"
    argvs = {}
    for role, index in (("leaderTemplate", "0"), ("workerTemplate", "1")):
        (c,) = lws["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"]
        args = [a.replace("$(LWS_LEADER_ADDRESS)", leader).replace("$(LWS_WORKER_INDEX)", index) for a in c["args"]]
        argvs[role] = entrypoint_argv(tmp_path, args, helm_env(c))
    assert argvs["leaderTemplate"][:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argvs["workerTemplate"][:3] == ["vllm", "serve", "/models"] and "--headless" in argvs["workerTemplate"]
    script = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "out = {}\n"
        "for role, argv in json.loads(sys.stdin.read()).items():\n"
        "    a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)\n"
        "    out[role] = [a.tensor_parallel_size, a.pipeline_parallel_size, a.nnodes, a.node_rank,\n"
        "                 a.master_addr, a.headless, a.shutdown_timeout]\n"
        "print(json.dumps(out))\n"
    )
    parsed_input = {"leaderTemplate": argvs["leaderTemplate"][3:],
                    "workerTemplate": ["--model", *argvs["workerTemplate"][2:]]}
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(parsed_input),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["leaderTemplate"][:3] == parsed["workerTemplate"][:3] == [8, 2, 2]
    assert parsed["workerTemplate"][3:6] == [1, leader, True]
    assert parsed["leaderTemplate"][3:7] == [0, leader, False, 120]
