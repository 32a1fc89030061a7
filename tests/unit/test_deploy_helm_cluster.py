"""What the chart needs on a real cluster, checked on `helm template` output (no cluster here):
installs without optional CRDs, GPU placement and parallelism, rollouts and drains, disruption
budgets, engine autoscaling, the edge, model storage, pod hardening, closed-by-default access
(client keys, engine key, NetworkPolicy), and every manifest against the Kubernetes 1.33 schema
(kubernetes-validate, strict). Each test names the item of docs/deploy.md's production checklist."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path


import kubernetes_validate
import pytest
import yaml
from support.helm_render import (
    CHART,
    ENGINE,
    GATEWAY,
    KEDA,
    LWS,
    NAMESPACE,
    PROMETHEUS_OPERATOR,
    RELEASE,
    VALUES,
    Doc,
    by_kind,
    container,
    env_of,
    helm,
    matches,
    pod_spec,
    render,
    render_error,
    sets,
)

K8S_VERSION = "1.33.0"
GPU = VALUES["gpu"]
REV = "0123456789abcdef0123456789abcdef01234567"


def engine_args(docs: list[Doc]) -> list[str]:
    return container(docs, ENGINE)["args"]


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def startup_budget(c: Doc) -> int:
    probe = c["startupProbe"]
    return int(probe.get("initialDelaySeconds", 0)) + int(probe["periodSeconds"]) * int(probe["failureThreshold"])


def prestop_sleep(c: Doc) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# -- 1. Installs without the Prometheus Operator ---------------------------------------------------
def test_monitors_only_where_the_operator_api_exists() -> None:
    for args in (GPU, [*GPU, *sets(metrics__serviceMonitor__enabled=True, metrics__podMonitor__enabled=True)]):
        kinds = {d["kind"] for d in render(*args)}
        assert not kinds & {"ServiceMonitor", "PodMonitor"}, args  # no CRD: nothing that would abort the install
    docs = render(*GPU, *PROMETHEUS_OPERATOR, *sets(metrics__serviceMonitor__enabled=True,
                                                    metrics__podMonitor__enabled=True))
    services = by_kind(docs, "Service")
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitors = by_kind(docs, kind)
        assert sorted(monitors) == [ENGINE, GATEWAY], kind
        # The gateway is scraped on its metrics port, the engine on its only port.
        assert monitors[GATEWAY]["spec"][endpoints][0]["port"] == "metrics"
        assert monitors[ENGINE]["spec"][endpoints][0]["port"] == "http"
    gateway_ports = {p["name"] for p in services[GATEWAY]["spec"]["ports"]}
    assert "metrics" in gateway_ports
    assert not {d["kind"] for d in render(*PROMETHEUS_OPERATOR)} & {"ServiceMonitor", "PodMonitor"}  # off by default


# -- 2. GPU placement by the resource request -------------------------------------------------------
def test_gpu_engines_are_placed_by_their_gpu_request_alone() -> None:
    spec = pod_spec(by_kind(render(*GPU), "Deployment")[ENGINE])
    assert "nodeSelector" not in spec  # nvidia.com/gpu.present exists only with GFD / the GPU Operator
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    docs = render(*GPU, *sets(engine__runtimeClassName="nvidia", engine__priorityClassName="llm-serving",
                              gateway__priorityClassName="llm-edge"),
                  "--set", "engine.nodeSelector.cloud\\.google\\.com/gke-accelerator=nvidia-h100-80gb",
                  "--set", "engine.tolerations[0].key=dedicated", "--set", "engine.tolerations[0].operator=Exists")
    spec = pod_spec(by_kind(docs, "Deployment")[ENGINE])
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "llm-serving"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "dedicated", "operator": "Exists"} in spec["tolerations"]
    assert pod_spec(by_kind(docs, "Deployment")[GATEWAY])["priorityClassName"] == "llm-edge"


# -- 3. Tensor parallelism from the GPU count; multi-node engines ----------------------------------
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_tensor_parallel_size_follows_the_gpus(gpus: int) -> None:
    docs = render(*GPU, *sets(engine__gpus=gpus))
    assert flag(engine_args(docs), "--tensor-parallel-size") == str(gpus)
    assert container(docs, ENGINE)["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert flag(engine_args(render(*GPU, *sets(engine__gpus=gpus, engine__tensorParallelSize=gpus))),
                "--tensor-parallel-size") == str(gpus)


def test_tensor_parallel_mismatch_fails_the_render() -> None:
    assert "must equal engine.gpus" in render_error(*GPU, *sets(engine__gpus=4, engine__tensorParallelSize=2))
    assert "needs engine.device=gpu" in render_error(*sets(engine__tensorParallelSize=2))
    assert flag(engine_args(render()), "--tensor-parallel-size") is None  # CPU: vLLM's default


def test_multi_node_engine_is_a_leader_worker_set_and_the_gateway_reaches_leaders() -> None:
    args = [*GPU, *sets(engine__gpus=8, engine__multiNode__enabled=True, engine__multiNode__nodes=2)]
    assert "LeaderWorkerSet API" in render_error(*args)  # without LWS installed: a clear refusal
    docs = render(*args, *LWS)
    assert ENGINE not in by_kind(docs, "Deployment")
    lws = by_kind(docs, "LeaderWorkerSet")[ENGINE]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    leader, worker = (template[t]["spec"]["containers"][0] for t in ("leaderTemplate", "workerTemplate"))
    for c in (leader, worker):
        a = c["args"]
        assert flag(a, "--tensor-parallel-size") == "8" and flag(a, "--pipeline-parallel-size") == "2"
        assert flag(a, "--nnodes") == "2" and flag(a, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert flag(a, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert env_of(worker)["SPECSERVE_ENGINE_HEADLESS"]["value"] == "1"
    assert "SPECSERVE_ENGINE_HEADLESS" not in env_of(leader)
    assert "readinessProbe" in leader and "readinessProbe" not in worker and "ports" not in worker
    headless = by_kind(docs, "Service")[f"{RELEASE}-specserve-engine-headless"]
    assert headless["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    # Group members reach each other through the NetworkPolicy.
    policy = by_kind(docs, "NetworkPolicy")[ENGINE]
    peers = [p["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for p in rule["from"]]
    assert any(sel.get("app.kubernetes.io/component") == "engine" for sel in peers)


# -- 4. Rollouts ------------------------------------------------------------------------------------
def test_gpu_rollouts_need_no_spare_gpu_and_outlast_the_startup_budget() -> None:
    for args, surge in ((GPU, 0), ([], 1)):
        dep = by_kind(render(*args), "Deployment")[ENGINE]
        rolling = dep["spec"]["strategy"]["rollingUpdate"]
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (surge, 1 - surge), args
        assert dep["spec"]["progressDeadlineSeconds"] > startup_budget(pod_spec(dep)["containers"][0]), args
    custom = render(*GPU, "--set", "engine.strategy.type=Recreate")
    assert by_kind(custom, "Deployment")[ENGINE]["spec"]["strategy"] == {"type": "Recreate"}
    assert "must exceed the startup probe" in render_error(*GPU, *sets(engine__progressDeadlineSeconds=600))


# -- 5. Model storage -------------------------------------------------------------------------------
def test_pvc_create_is_refused_with_what_replaces_it() -> None:
    err = render_error(*sets(model__source="pvc", model__pvc__claimName="m", model__pvc__create=True))
    assert "model.download.cache" in err
    assert "PersistentVolumeClaim" not in {d["kind"] for d in render(*GPU)}


def test_download_needs_a_pinned_revision_and_fills_a_shared_cache() -> None:
    base = sets(model__source="download", model__download__repo="org/model")
    assert "40-character commit" in render_error(*base)
    assert "40-character commit" in render_error(*base, *sets(model__download__revision="main"))
    docs = render(*base, *sets(model__download__revision=REV, model__download__cache__create=True,
                               model__download__cache__storageClassName="nfs"))
    claim = by_kind(docs, "PersistentVolumeClaim")[f"{RELEASE}-specserve-model-cache"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    spec = pod_spec(by_kind(docs, "Deployment")[ENGINE])
    volume = [v for v in spec["volumes"] if v["name"] == "model"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (init,) = spec["initContainers"]
    assert ".specserve-complete" in init["command"][-1]  # filled once, then reused
    assert [m for m in init["volumeMounts"] if m["name"] == "model"][0].get("readOnly") is not True
    assert [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"][0]["readOnly"] is True
    existing = render(*base, *sets(model__download__revision=REV, model__download__cache__claimName="shared"))
    assert "PersistentVolumeClaim" not in {d["kind"] for d in existing}
    volume = [v for v in pod_spec(by_kind(existing, "Deployment")[ENGINE])["volumes"] if v["name"] == "model"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == "shared"


# -- 6. Images: registry and digest ------------------------------------------------------------------
def test_images_take_a_registry_and_a_digest() -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(*sets(imageRegistry="registry.example.com/ml", engine__image__digest=digest,
                        gateway__image__registry="ghcr.io/acme"))
    assert container(docs, ENGINE)["image"] == f"registry.example.com/ml/specserve-engine-cpu:0.1.0@{digest}"
    assert container(docs, GATEWAY)["image"] == "ghcr.io/acme/specserve-gateway:0.1.0"
    assert render_error(*sets(engine__image__digest="latest"))


# -- 7. Drains --------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", sorted(VALUES))
def test_pods_drain_before_the_kubelet_kills_them(values: str) -> None:
    docs = render(*VALUES[values])
    engine_spec = pod_spec(by_kind(docs, "Deployment")[ENGINE])
    engine = engine_spec["containers"][0]
    shutdown = int(flag(engine["args"], "--shutdown-timeout") or 0)
    assert shutdown > 0  # vLLM's default 0 aborts in-flight requests on SIGTERM
    assert prestop_sleep(engine) > 0
    assert engine_spec["terminationGracePeriodSeconds"] > prestop_sleep(engine) + shutdown
    gateway_spec = pod_spec(by_kind(docs, "Deployment")[GATEWAY])
    gateway = gateway_spec["containers"][0]
    drain = float(flag(gateway["args"], "--drain-timeout") or 30)
    assert gateway_spec["terminationGracePeriodSeconds"] > prestop_sleep(gateway) + drain


def test_a_grace_period_below_the_drain_fails_the_render() -> None:
    assert "below preStopSleepSeconds + drain" in render_error(*sets(engine__terminationGracePeriodSeconds=60))
    assert "below preStopSleepSeconds + drain" in render_error(*sets(gateway__terminationGracePeriodSeconds=30))
    docs = render(*sets(engine__shutdownTimeoutSeconds=300, engine__preStopSleepSeconds=20))
    assert pod_spec(by_kind(docs, "Deployment")[ENGINE])["terminationGracePeriodSeconds"] == 335


# -- 8. Disruption budgets ---------------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_gateway_pdb_never_blocks_a_node_drain(replicas: int) -> None:
    docs = render(*sets(gateway__replicaCount=replicas))
    pdb = by_kind(docs, "PodDisruptionBudget")[GATEWAY]["spec"]
    allowed = pdb["maxUnavailable"] if "maxUnavailable" in pdb else replicas - pdb["minAvailable"]
    assert allowed >= 1
    assert "minAvailable" not in by_kind(render(*GPU), "PodDisruptionBudget")[ENGINE]["spec"]


def test_pdb_min_available_at_the_replica_count_is_refused() -> None:
    err = render_error(*sets(gateway__replicaCount=1, gateway__pdb__minAvailable=1, gateway__pdb__maxUnavailable="null"))
    assert "blocks every node drain" in err
    docs = render(*sets(gateway__replicaCount=3, gateway__pdb__minAvailable=2, gateway__pdb__maxUnavailable="null"))
    assert by_kind(docs, "PodDisruptionBudget")[GATEWAY]["spec"]["minAvailable"] == 2


# -- 9. Engine autoscaling ---------------------------------------------------------------------------
def test_engines_scale_on_queue_depth_with_keda_or_an_external_hpa() -> None:
    on = sets(engine__autoscaling__enabled=True, engine__autoscaling__maxReplicas=6)
    assert "needs KEDA" in render_error(*GPU, *on)
    docs = render(*GPU, *on, *KEDA)
    assert "replicas" not in by_kind(docs, "Deployment")[ENGINE]["spec"]  # the autoscaler owns it
    scaled = by_kind(docs, "ScaledObject")[ENGINE]["spec"]
    assert scaled["scaleTargetRef"]["name"] == ENGINE and scaled["maxReplicaCount"] == 6
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    hpa = by_kind(render(*GPU, *on, *sets(engine__autoscaling__mode="hpa")), "HorizontalPodAutoscaler")[ENGINE]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and hpa["spec"]["scaleTargetRef"]["name"] == ENGINE
    assert {d["kind"] for d in render(*GPU)}.isdisjoint({"ScaledObject", "HorizontalPodAutoscaler"})


# -- 10. The edge -------------------------------------------------------------------------------------
def test_ingress_keeps_streams_open_and_routes_only_the_api() -> None:
    docs = render(*sets(gateway__ingress__enabled=True, gateway__requestTimeoutSeconds=900))
    ingress = by_kind(docs, "Ingress")[GATEWAY]
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 900
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) > 900
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert flag(container(docs, GATEWAY)["args"], "--request-timeout") == "900"
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/v1" and path["backend"]["service"]["port"]["name"] == "http"
    own = render(*sets(gateway__ingress__enabled=True),
                 "--set-string", "gateway.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-read-timeout=3600")
    assert by_kind(own, "Ingress")[GATEWAY]["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"  # the user's value wins


def test_http_route_option() -> None:
    assert "parentRefs" in render_error(*sets(gateway__httpRoute__enabled=True))
    docs = render(*sets(gateway__httpRoute__enabled=True), "--set-json", 'gateway.httpRoute.parentRefs=[{"name": "public"}]',
                  "--set", "gateway.httpRoute.hostnames[0]=llm.example.com")
    route = by_kind(docs, "HTTPRoute")[GATEWAY]["spec"]
    assert route["parentRefs"] == [{"name": "public"}] and route["hostnames"] == ["llm.example.com"]
    (rule,) = route["rules"]
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/v1"}
    assert rule["backendRefs"] == [{"name": GATEWAY, "port": 8000}]
    assert int(rule["timeouts"]["request"].rstrip("s")) > 600


def test_metrics_have_their_own_port() -> None:
    docs = render()
    gateway = container(docs, GATEWAY)
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert flag(gateway["args"], "--metrics-port") == str(ports["metrics"]) != str(ports["http"])


# -- 11. Pod hardening, QoS, spread, helm test, stable pod templates -----------------------------------
def test_guaranteed_qos_option() -> None:
    for args in (GPU, sets(engine__guaranteedQoS=True)):
        res = container(render(*args), ENGINE)["resources"]
        assert res["requests"]["cpu"] == res["limits"]["cpu"] and res["requests"]["memory"] == res["limits"]["memory"]
    res = container(render(), ENGINE)["resources"]
    assert res["requests"] != res["limits"]  # default CPU values stay Burstable


def test_replicas_spread_over_nodes_and_zones() -> None:
    docs = render(*GPU)
    for name in (ENGINE, GATEWAY):
        dep = by_kind(docs, "Deployment")[name]
        constraints = pod_spec(dep)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for c in constraints:
            assert c["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_gateway_root_filesystem_is_read_only_with_a_writable_tmp() -> None:
    spec = pod_spec(by_kind(render(), "Deployment")[GATEWAY])
    c = spec["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts and mounts["/tmp"] in {v["name"] for v in spec["volumes"]}


def test_helm_test_pod_sends_one_chat_completion_with_a_key() -> None:
    docs = render()
    pod = by_kind(docs, "Pod")[f"{RELEASE}-specserve-test-chat"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert "/v1/chat/completions" in c["command"][-1]
    env = env_of(c)
    assert env["GATEWAY_URL"]["value"] == f"http://{GATEWAY}:8000"
    assert env["API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-specserve-api-keys"
    assert "Pod" not in {d["kind"] for d in render(*sets(tests__enabled=False))}


def test_a_chart_version_bump_leaves_pod_templates_unchanged(tmp_path: Path) -> None:
    bumped = tmp_path / "specserve"
    shutil.copytree(CHART, bumped)
    chart = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart))
    proc = helm("template", RELEASE, str(bumped), "--namespace", NAMESPACE, *GPU)
    assert proc.returncode == 0, proc.stderr
    after = {d["metadata"]["name"]: d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "Deployment"}
    before = by_kind(render(*GPU), "Deployment")
    for name, dep in before.items():
        old, new = dep["spec"]["template"], after[name]["spec"]["template"]
        assert json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True), name  # no restart
        assert "helm.sh/chart" not in old["metadata"]["labels"]
        assert "app.kubernetes.io/version" not in old["metadata"]["labels"]


# -- Closed by default (security issue, items 7 and 8) -------------------------------------------------
def test_network_policy_lets_only_gateway_pods_reach_the_engine_port() -> None:
    docs = render()
    policy = by_kind(docs, "NetworkPolicy")[ENGINE]["spec"]
    engine_labels = by_kind(docs, "Deployment")[ENGINE]["spec"]["template"]["metadata"]["labels"]
    gateway_labels = by_kind(docs, "Deployment")[GATEWAY]["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["podSelector"]["matchLabels"], engine_labels)
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 8100, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and matches(peer["podSelector"]["matchLabels"], gateway_labels)
    assert not matches(peer["podSelector"]["matchLabels"], engine_labels)
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    with_scraper = render("--set-json", f"networkPolicy.metricsScrapers=[{json.dumps(scraper)}]")
    (rule,) = by_kind(with_scraper, "NetworkPolicy")[ENGINE]["spec"]["ingress"]
    assert rule["from"][1] == scraper
    assert by_kind(render(*sets(networkPolicy__enabled=False)), "NetworkPolicy") == {}


def test_engine_key_reaches_engine_and_gateway_from_one_secret() -> None:
    docs = render()
    secret = by_kind(docs, "Secret")[f"{RELEASE}-specserve-engine-key"]
    key = base64.b64decode(secret["data"]["engine-api-key"]).decode()
    assert len(key) >= 40
    refs = [env_of(container(docs, name))["SPECSERVE_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]
            for name in (ENGINE, GATEWAY)]
    assert refs[0] == refs[1] == {"name": f"{RELEASE}-specserve-engine-key", "key": "engine-api-key"}
    for doc in docs:
        if doc["kind"] != "Secret":
            assert key not in yaml.safe_dump(doc)
    own = render(*sets(engineAuth__existingSecret="vault-engine-key"))
    assert f"{RELEASE}-specserve-engine-key" not in by_kind(own, "Secret")
    assert env_of(container(own, ENGINE))["SPECSERVE_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
        "vault-engine-key"


def test_open_gateway_only_on_purpose_and_engine_addresses_stay_private() -> None:
    gateway = container(render(), GATEWAY)
    assert "--expose-replica-addresses" not in gateway["args"]
    assert "SPECSERVE_ALLOW_UNAUTHENTICATED" not in env_of(gateway)
    open_gateway = container(render(*sets(auth__enabled=False, gateway__exposeReplicaAddresses=True)), GATEWAY)
    assert env_of(open_gateway)["SPECSERVE_ALLOW_UNAUTHENTICATED"]["value"] == "1"
    assert "SPECSERVE_API_KEYS" not in env_of(open_gateway)
    assert "--expose-replica-addresses" in open_gateway["args"]


# -- Kubernetes schema ---------------------------------------------------------------------------------
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "gpu": GPU,
    "minimal": VALUES["minimal"],
    "gpu-tp4-monitors-keda": [*GPU, *PROMETHEUS_OPERATOR, *KEDA, *sets(
        engine__gpus=4, metrics__serviceMonitor__enabled=True, metrics__podMonitor__enabled=True,
        engine__autoscaling__enabled=True, engine__runtimeClassName="nvidia")],
    "multi-node": [*GPU, *LWS, *sets(engine__gpus=8, engine__multiNode__enabled=True)],
    "edge": [*sets(gateway__ingress__enabled=True, gateway__httpRoute__enabled=True, gateway__autoscaling__enabled=True,
                   engine__autoscaling__enabled=True, engine__autoscaling__mode="hpa"),
             "--set-json", 'gateway.httpRoute.parentRefs=[{"name": "public"}]'],
    "download-cache": sets(model__source="download", model__download__repo="org/m", model__download__revision=REV,
                           model__download__cache__create=True, auth__enabled=False, networkPolicy__enabled=False),
}
# Custom resources: the kubernetes schema does not know them; their pod templates are checked as
# Deployment templates and their top-level fields against the fields their CRDs define.
CRD_FIELDS: dict[str, set[str]] = {
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel"},
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"},
    "ScaledObject": {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                     "triggers", "advanced", "fallback"},
    "LeaderWorkerSet": {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"},
    "HTTPRoute": {"parentRefs", "hostnames", "rules"},
}


def _as_deployment(template: Doc) -> Doc:
    labels = template["metadata"]["labels"]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "t"},
            "spec": {"selector": {"matchLabels": labels}, "template": template}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_validate_against_the_kubernetes_schema(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_FIELDS:
            assert set(doc["spec"]) <= CRD_FIELDS[doc["kind"]], name
            if doc["kind"] == "LeaderWorkerSet":
                for key in ("leaderTemplate", "workerTemplate"):
                    kubernetes_validate.validate(_as_deployment(doc["spec"]["leaderWorkerTemplate"][key]),
                                                 K8S_VERSION, strict=True)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{variant}: {name}: {exc.message} at {list(exc.path)}") from exc


LINT_VARIANTS: dict[str, list[str]] = {
    # helm lint cannot announce CRD APIs (no --api-versions): monitors are skipped there, and the
    # multi-node and KEDA variants, which refuse to render without their API, are the render tests'.
    "gpu-tp4-monitors": [*GPU, *sets(engine__gpus=4, metrics__serviceMonitor__enabled=True,
                                     metrics__podMonitor__enabled=True, engine__runtimeClassName="nvidia")],
    "edge": VARIANTS["edge"],
    "download-cache": VARIANTS["download-cache"],
}


@pytest.mark.parametrize("variant", sorted(LINT_VARIANTS))
def test_helm_lint_strict_with_the_new_switches(variant: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *LINT_VARIANTS[variant])
    assert proc.returncode == 0, proc.stdout + proc.stderr
