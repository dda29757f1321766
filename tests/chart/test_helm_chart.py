"""The Helm chart, rendered by the real Helm engine and checked against Kubernetes' own schemas.

No cluster is needed: helm-python renders offline, kubernetes-validate checks every object
against the OpenAPI schema of a current Kubernetes release (strict: unknown fields fail), and the
tests then assert the properties the deployment relies on: redundancy, drain timing, pod
security, network isolation, and that the gateway is started with flags and variables it reads.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError, lint
from kubernetes_validate.utils import latest_version

from bgremove_gateway.cli import build_parser
from bgremove_gateway.triton.client import ADMIN_HEADER
from bgremove_gateway.triton.embedded import ADMIN_PROTOCOLS

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "bgremove"
RELEASE = "demo"
NAMESPACE = "imaging"

Obj = dict[str, Any]

PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIBfake\n-----END PRIVATE KEY-----\n"

# What sidecars and init containers of a user's own must carry to pass the restricted profile.
RESTRICTED: Obj = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

# Value sets that must all render to valid objects with the properties below.
SCENARIOS: dict[str, Obj] = {
    "defaults": {},
    "cpu-profile": {
        "triton": {
            "profile": "cpu",
            "cpuImage": {"repository": "registry.example/triton-cpu", "tag": "24.10"},
        }
    },
    "tls-created-secret": {"gateway": {"tls": {"enabled": True, "cert": PEM, "key": KEY}}},
    "tls-native-probe": {
        "gateway": {"tls": {"enabled": True, "existingSecret": "gw-cert", "probe": "tls"}},
    },
    "existing-secrets-mtls": {
        "gateway": {
            "tls": {"enabled": True, "existingSecret": "gw-cert", "clientAuth": True},
            "auth": {"enabled": True, "existingSecret": "gw-keys", "existingSecretKey": "keys.json"},
        },
        "tests": {"tls": {"clientSecret": "test-client-cert"}, "apiKey": {"existingSecret": "test-key"}},
    },
    "created-api-keys": {"gateway": {"auth": {"enabled": True, "apiKeysJson": '{"keys": []}'}}},
    "autoscaling": {
        "gateway": {"autoscaling": {"enabled": True}},
        "triton": {"autoscaling": {"enabled": True, "queueTime": {"enabled": True}}},
    },
    "model-repo-pvc": {"modelRepository": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "v1"}}},
    "model-repo-s3": {
        "modelRepository": {
            "source": "objectStore",
            "objectStore": {"uri": "s3://bucket/bgremove/models", "envFromSecret": "s3-creds"},
        }
    },
    "model-repo-gcs": {
        "modelRepository": {
            "source": "objectStore",
            "objectStore": {"uri": "gs://bucket/models", "gcsCredentialsSecret": "gcs-key"},
        }
    },
    "load-balancer-otel": {
        "gateway": {
            "service": {
                "type": "LoadBalancer",
                "loadBalancerSourceRanges": ["203.0.113.0/24"],
                "externalTrafficPolicy": "Local",
            },
            "networkPolicy": {"allowedFrom": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]},
        },
        "otel": {"endpoint": "http://otel-collector.observability.svc:4318/"},
    },
    "gpu-tensorrt-cache": {
        "triton": {
            "modelConfigName": "gpu-tensorrt",
            "extraVolumes": [{"name": "trt-cache", "persistentVolumeClaim": {"claimName": "trt-cache"}}],
            "extraVolumeMounts": [{"name": "trt-cache", "mountPath": "/tmp/trt-cache"}],
        }
    },
    "hard-anti-affinity": {"gateway": {"podAntiAffinity": "hard"}, "triton": {"podAntiAffinity": "hard"}},
    "openshift": {"openshift": True},
    "extra-containers": {
        "gateway": {
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "extraVolumes": [{"name": "extra", "secret": {"secretName": "extra"}}],
            "extraVolumeMounts": [{"name": "extra", "mountPath": "/etc/extra", "readOnly": True}],
            "sidecars": [{"name": "proxy", "image": "proxy:1", "securityContext": RESTRICTED}],
            "initContainers": [{"name": "wait", "image": "busybox:1", "securityContext": RESTRICTED}],
        },
        "triton": {
            "runtimeClassName": "nvidia",
            "sidecars": [{"name": "exporter", "image": "exporter:1", "securityContext": RESTRICTED}],
            "initContainers": [{"name": "warm", "image": "busybox:1", "securityContext": RESTRICTED}],
        },
    },
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
        "grafana": {"dashboard": {"enabled": True}},
    },
    "pod-monitor": {"metrics": {"podMonitor": {"enabled": True, "interval": "15s"}}},
    "shared-limits": {"gateway": {"limits": {"redis": {"url": "redis://:secret@redis.cache.svc:6380/0"}}}},
    "shared-limits-hpa": {
        "gateway": {
            "autoscaling": {"enabled": True},
            "limits": {"redis": {"existingSecret": "redis-url", "existingSecretKey": "url"}},
        }
    },
    "egress": {
        "gateway": {
            "networkPolicy": {"egress": {"enabled": True}},
            "limits": {"redis": {"url": "rediss://redis.cache.svc:6380"}},
        },
        "otel": {"endpoint": "http://otel-collector.observability.svc:4318/"},
    },
    "listeners-off": {
        "gateway": {"http": {"enabled": False}, "metrics": {"enabled": False}},
        "tests": {"enabled": False},
    },
    "existing-admin-key": {
        "triton": {
            "adminKey": {
                "existingSecret": "triton-admin",
                "existingSecretKey": "key",
                "restrictedApis": ["model-repository", "shared-memory", "trace", "logging", "statistics"],
            }
        }
    },
}


MONITORING = "monitoring.coreos.com"
DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")
# The fields of Prometheus Operator's v1 CRDs the chart may write (a typo would be dropped silently).
MONITOR_SPEC = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}


def check_monitor_shape(obj: Obj) -> None:
    """A ServiceMonitor or PodMonitor as monitoring.coreos.com/v1 defines it, field by field."""
    assert obj["apiVersion"] == f"{MONITORING}/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    endpoints = MONITOR_SPEC[obj["kind"]]
    spec = obj["spec"]
    assert set(spec) == {"selector", "namespaceSelector", endpoints}
    assert set(spec["selector"]) == {"matchLabels"} and spec["selector"]["matchLabels"]
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["namespaceSelector"] == {"matchNames": [obj["metadata"]["namespace"]]}
    assert spec[endpoints]
    for endpoint in spec[endpoints]:
        assert set(endpoint) <= ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert DURATION.fullmatch(endpoint["interval"]) and DURATION.fullmatch(endpoint["scrapeTimeout"])


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Chart, values: Obj) -> tuple[list[Obj], str]:
    """Every object the chart renders for ``values``, and the NOTES text."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def one(objects: list[Obj], kind: str, component: str) -> Obj:
    found = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
    return found[0]


def container(deployment: Obj, name: str) -> Obj:
    pod = deployment["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def pod_labels(deployment: Obj) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def flag_value(args: list[str], flag: str) -> str:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def loaded_models(triton_args: list[str]) -> list[str]:
    """Triton's --load-model values, in order."""
    return [a.split("=", 1)[1] for a in triton_args if a.startswith("--load-model=")]


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest, chart: Chart) -> tuple[str, list[Obj], str]:
    name: str = request.param
    objects, notes = render(chart, copy.deepcopy(SCENARIOS[name]))
    return name, objects, notes


# --- Kubernetes validity -------------------------------------------------------------------------


def test_every_object_is_valid_for_current_kubernetes(scenario: tuple[str, list[Obj], str]) -> None:
    _, objects, _ = scenario
    version = latest_version()
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 33), "schemas for a current Kubernetes"
    for obj in objects:
        if obj["apiVersion"].startswith(f"{MONITORING}/"):
            check_monitor_shape(obj)  # kubernetes-validate has no CRD schemas
        else:
            kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert len(obj["metadata"]["name"]) <= 63


def test_lint_is_clean_in_strict_mode() -> None:
    for name in ("defaults", "tls-created-secret", "autoscaling", "monitoring", "egress", "extra-containers"):
        values = SCENARIOS[name]
        report = lint(CHART_DIR, copy.deepcopy(values), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


# --- Redundancy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["gateway", "triton"])
def test_both_workloads_spread_over_zones_and_hosts(
    scenario: tuple[str, list[Obj], str], component: str
) -> None:
    _, objects, _ = scenario
    deployment = one(objects, "Deployment", component)
    pod = deployment["spec"]["template"]["spec"]
    labels = pod_labels(deployment)
    keys = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(keys) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in keys.values():
        assert constraint["maxSkew"] == 1
        assert selects(constraint["labelSelector"]["matchLabels"], labels)
        # Nodes the pod cannot run on (tainted GPU nodes, cordoned ones, outside its nodeSelector) are
        # not empty domains: counted, they would block the hard host spread (kubernetes#107464, #116118).
        assert constraint["nodeTaintsPolicy"] == "Honor"
        assert constraint["nodeAffinityPolicy"] == "Honor"
        # Counts only pods of one revision, so a rolling update is never blocked by the old one.
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    anti = pod["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert terms, "anti-affinity keeps replicas on different nodes"
    for term in terms:
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert selects(term["labelSelector"]["matchLabels"], labels)


def test_default_replicas_and_disruption_budgets_keep_capacity(chart: Chart) -> None:
    objects, _ = render(chart, {})
    floors = {"gateway": 2, "triton": 1}
    for component, floor in floors.items():
        deployment = one(objects, "Deployment", component)
        pdb = one(objects, "PodDisruptionBudget", component)
        replicas = deployment["spec"]["replicas"]
        assert pdb["spec"]["minAvailable"] >= floor
        # Leaves room for at least one voluntary eviction, or node drains would hang forever.
        assert pdb["spec"]["minAvailable"] < replicas
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        # Upgrades never drop below the replica count.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(objects, "Deployment", "gateway")["spec"]["replicas"] == 3
    assert one(objects, "Deployment", "triton")["spec"]["replicas"] == 2


def test_autoscalers_target_their_deployments_and_own_the_replica_count(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["autoscaling"]))
    for component in ("gateway", "triton"):
        deployment = one(objects, "Deployment", component)
        hpa = one(objects, "HorizontalPodAutoscaler", component)
        assert "replicas" not in deployment["spec"], "a fixed replica count would fight the HPA"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert (
            hpa["spec"]["minReplicas"]
            > one(objects, "PodDisruptionBudget", component)["spec"]["minAvailable"]
        )
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu[0]["resource"]["name"] == "cpu"
        assert "cpu" in container(deployment, component)["resources"]["requests"]
    queue = [
        m for m in one(objects, "HorizontalPodAutoscaler", "triton")["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert queue[0]["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert not any(o["kind"] == "HorizontalPodAutoscaler" for o in render(chart, {})[0])


# --- Services and how the gateway finds Triton ---------------------------------------------------


def test_gateway_dials_the_headless_triton_service(scenario: tuple[str, list[Obj], str]) -> None:
    _, objects, _ = scenario
    gateway = one(objects, "Deployment", "gateway")
    triton = one(objects, "Deployment", "triton")
    headless = one(objects, "Service", "triton")
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], pod_labels(triton))
    assert not selects(headless["spec"]["selector"], pod_labels(gateway))
    url = flag_value(container(gateway, "gateway")["args"], "--triton-url")
    host, port = url.rsplit(":", 1)
    assert host == f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert int(port) == grpc_port["port"]
    triton_ports = {p["name"]: p["containerPort"] for p in container(triton, "triton")["ports"]}
    assert triton_ports["grpc"] == int(port)
    assert flag_value(container(triton, "triton")["args"], "--grpc-port") == port


def test_gateway_service_exposes_the_grpc_port(scenario: tuple[str, list[Obj], str]) -> None:
    name, objects, _ = scenario
    gateway = one(objects, "Deployment", "gateway")
    service = one(objects, "Service", "gateway")
    assert selects(service["spec"]["selector"], pod_labels(gateway))
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    listen = flag_value(container(gateway, "gateway")["args"], "--listen")
    grpc = next(p for p in container(gateway, "gateway")["ports"] if p["name"] == "grpc")
    assert listen == f"0.0.0.0:{grpc['containerPort']}"
    expected = "LoadBalancer" if name == "load-balancer-otel" else "ClusterIP"
    assert service["spec"]["type"] == expected


# --- Probes and draining ----------------------------------------------------------------------------


def test_gateway_probes_use_grpc_health_reachable_by_the_kubelet(
    scenario: tuple[str, list[Obj], str],
) -> None:
    name, objects, _ = scenario
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    readiness = gw["readinessProbe"]["grpc"]
    args = gw["args"]
    tls = "--tls-cert" in args
    if not tls:
        assert readiness["port"] == ports["grpc"] and "mode" not in readiness
    elif readiness.get("mode") == "TLS":
        assert name == "tls-native-probe" and readiness["port"] == ports["grpc"]
    else:
        # The kubelet cannot speak TLS to the serving port; the health-only plaintext listener serves it.
        assert readiness["port"] == ports["grpc-health"] != ports["grpc"]
        assert flag_value(args, "--health-listen") == f"0.0.0.0:{ports['grpc-health']}"
    # Liveness and startup must not depend on Triton: a Triton outage must not restart gateways.
    for probe in ("livenessProbe", "startupProbe"):
        assert gw[probe]["tcpSocket"]["port"] == ports["grpc"]


def test_triton_probes_use_its_http_health_endpoints(scenario: tuple[str, list[Obj], str]) -> None:
    _, objects, _ = scenario
    triton = container(one(objects, "Deployment", "triton"), "triton")
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "grpc" not in triton["readinessProbe"], "Triton has no grpc.health.v1"
    http = next(p for p in triton["ports"] if p["name"] == "http")
    assert flag_value(triton["args"], "--http-port") == str(http["containerPort"])


def test_grace_periods_outlast_pre_stop_plus_drain(scenario: tuple[str, list[Obj], str]) -> None:
    _, objects, _ = scenario
    gateway = one(objects, "Deployment", "gateway")
    gw = container(gateway, "gateway")
    drain = float(flag_value(gw["args"], "--drain-seconds"))
    pre_stop = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain

    triton = one(objects, "Deployment", "triton")
    tr = container(triton, "triton")
    exit_timeout = int(flag_value(tr["args"], "--exit-timeout-secs"))
    pre_stop = tr["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert triton["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + exit_timeout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"terminationGracePeriodSeconds": 30}}, "gateway.terminationGracePeriodSeconds (30)"),
        ({"gateway": {"drainSeconds": 60}}, "gateway.drainSeconds (60)"),
        ({"triton": {"exitTimeoutSeconds": 45}}, "triton.exitTimeoutSeconds (45)"),
        (
            {"gateway": {"podDisruptionBudget": {"minAvailable": 3}}},
            "gateway.podDisruptionBudget.minAvailable (3)",
        ),
        ({"triton": {"replicaCount": 1}}, "triton.podDisruptionBudget.minAvailable (1)"),
        (
            {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 4}}},
            "gateway.autoscaling.minReplicas (5)",
        ),
        (
            {
                "gateway": {
                    "tls": {"enabled": True, "existingSecret": "x", "clientAuth": True, "probe": "tls"}
                }
            },
            "kubelet has no client certificate",
        ),
        (
            {"triton": {"models": ["u2netp"]}},
            "gateway.defaultModel (u2net) must be one of triton.models (u2netp)",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(chart: Chart, values: Obj, message: str) -> None:
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- Pod security ---------------------------------------------------------------------------------


def test_pods_are_restricted_and_write_nothing_to_disk(scenario: tuple[str, list[Obj], str]) -> None:
    name, objects, _ = scenario
    for component in ("gateway", "triton"):
        pod = one(objects, "Deployment", component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name == "openshift":
            # restricted-v2 assigns the namespace's ids and refuses pods that ask for others.
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(pod["securityContext"])
        else:
            assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume
    # The test pod runs the gateway image with the same restrictions.
    for pod in [o["spec"] for o in objects if o["kind"] == "Pod"]:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The gateway holds images: it may mount Secrets and memory-backed scratch space, nothing else.
    gateway = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    for volume in gateway.get("volumes", []):
        assert "secret" in volume or volume.get("emptyDir", {}).get("medium") == "Memory", volume
    # The encode workers' /dev/shm is a memory volume of its own, not the runtime's 64 MiB default.
    (shm,) = [v for v in gateway["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    gateway_mounts = container(one(objects, "Deployment", "gateway"), "gateway")["volumeMounts"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in gateway_mounts
    triton = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in triton["volumes"]}
    mounts = {
        m["mountPath"]: m["name"]
        for m in container(one(objects, "Deployment", "triton"), "triton")["volumeMounts"]
    }
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_gateway_image_user_matches_the_pod_security_context(chart: Chart) -> None:
    objects, _ = render(chart, {})
    pod = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    user = _final_stage(_dockerfile_stages())["USER"][-1]
    uid, _, gid = user.partition(":")
    assert int(uid) == pod["securityContext"]["runAsUser"] != 0
    assert int(gid) == pod["securityContext"]["runAsGroup"]


# --- Network policy -------------------------------------------------------------------------------


def test_only_gateway_pods_reach_triton(scenario: tuple[str, list[Obj], str]) -> None:
    _, objects, _ = scenario
    gateway, triton = one(objects, "Deployment", "gateway"), one(objects, "Deployment", "triton")
    policy = one(objects, "NetworkPolicy", "triton")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(triton))
    assert not selects(policy["podSelector"]["matchLabels"], pod_labels(gateway))
    assert policy["policyTypes"] == ["Ingress"]
    triton_ports = {p["name"] for p in container(triton, "triton")["ports"]}
    grpc_rules = [r for r in policy["ingress"] if {p["port"] for p in r["ports"]} == {"grpc"}]
    assert len(grpc_rules) == 1
    (peer,) = grpc_rules[0]["from"]
    assert set(peer) == {"podSelector"}, "same namespace only"
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(gateway))
    assert not selects(peer["podSelector"]["matchLabels"], pod_labels(triton))
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in triton_ports
            assert port["port"] != "http", "Triton's HTTP port serves inference without authentication"


def _rules_by_port(policy: Obj) -> dict[str, list[list[Obj]]]:
    """Port name -> the `from` lists of the ingress rules that open it."""
    opened: dict[str, list[list[Obj]]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            opened.setdefault(port["port"], []).append(rule["from"])
    return opened


def test_only_allowed_sources_reach_the_gateway(scenario: tuple[str, list[Obj], str]) -> None:
    name, objects, _ = scenario
    gateway = one(objects, "Deployment", "gateway")
    policy = one(objects, "NetworkPolicy", "gateway")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(gateway))
    assert policy["policyTypes"][0] == "Ingress"
    container_ports = {p["name"] for p in container(gateway, "gateway")["ports"]}
    opened = _rules_by_port(policy)
    assert set(opened) <= container_ports
    clients: list[Obj]
    if name == "load-balancer-otel":
        clients = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    else:
        clients = [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"bgremove.io/client": "true"}}}]
    test_pods = [p for p in objects if p["kind"] == "Pod"]
    # gRPC: the clients, and this release's `helm test` pod when there is one.
    assert clients in opened["grpc"]
    assert len(opened["grpc"]) == 1 + len(test_pods)
    for peers in opened["grpc"]:
        if peers != clients:
            (peer,) = peers
            assert set(peer) == {"podSelector"}, "the test pod of this namespace only"
            assert selects(peer["podSelector"]["matchLabels"], test_pods[0]["metadata"]["labels"])
            assert not selects(peer["podSelector"]["matchLabels"], pod_labels(gateway))
    # HTTP: the same clients as gRPC, nobody else.
    assert opened.get("http", []) == ([clients] if "http" in container_ports else [])
    # Metrics: the scrapers, nobody else.
    scrapers = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert opened.get("metrics", []) == ([scrapers] if "metrics" in container_ports else [])


def test_no_allowed_sources_means_no_ingress(chart: Chart) -> None:
    objects, _ = render(
        chart,
        {"gateway": {"networkPolicy": {"allowedFrom": []}}, "metrics": {"networkPolicy": {"from": []}}},
    )
    # Only the release's own `helm test` pod is left, and without it nothing at all.
    opened = _rules_by_port(one(objects, "NetworkPolicy", "gateway")["spec"])
    assert list(opened) == ["grpc"] and len(opened["grpc"]) == 1
    assert opened["grpc"][0][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    objects, _ = render(
        chart,
        {
            "gateway": {"networkPolicy": {"allowedFrom": []}},
            "metrics": {"networkPolicy": {"from": []}},
            "tests": {"enabled": False},
        },
    )
    assert one(objects, "NetworkPolicy", "gateway")["spec"]["ingress"] == []


# --- GPU and CPU profiles -------------------------------------------------------------------------


def test_gpu_profile_requests_a_gpu_and_tolerates_gpu_nodes(chart: Chart) -> None:
    objects, _ = render(chart, {"triton": {"gpu": {"nodeSelector": {"nvidia.com/gpu.present": "true"}}}})
    pod = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    triton = container(one(objects, "Deployment", "triton"), "triton")
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag_value(triton["args"], "--model-config-name") == "gpu"
    assert flag_value(triton["args"], "--model-control-mode") == "explicit"
    # Both models by default, and the full U2-Net (the better mask) for requests that name none.
    assert loaded_models(triton["args"]) == ["u2net", "u2netp"]
    gateway = container(one(objects, "Deployment", "gateway"), "gateway")
    assert flag_value(gateway["args"], "--default-model") == "u2net"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_tensorrt_config_can_keep_its_engine_cache(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["gpu-tensorrt-cache"]))
    deployment = one(objects, "Deployment", "triton")
    triton = container(deployment, "triton")
    assert flag_value(triton["args"], "--model-config-name") == "gpu-tensorrt"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    mount = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/tmp/trt-cache")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "trt-cache"}


def test_cpu_profile_runs_without_gpus_in_its_own_image(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["cpu-profile"]))
    pod = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    triton = container(one(objects, "Deployment", "triton"), "triton")
    assert triton["image"] == "registry.example/triton-cpu:24.10"
    assert flag_value(triton["args"], "--model-config-name") == "cpu"
    assert "nvidia.com/gpu" not in triton["resources"].get("limits", {})
    assert "tolerations" not in pod and "nodeSelector" not in pod


# --- Model repository sources --------------------------------------------------------------------


def test_model_repository_from_an_image_is_copied_by_an_init_container(chart: Chart) -> None:
    objects, _ = render(chart, {"modelRepository": {"image": {"digest": "sha256:" + "a" * 64}}})
    deployment = one(objects, "Deployment", "triton")
    init = container(deployment, "model-repository")
    triton = container(deployment, "triton")
    assert init["image"] == "bgremove-model-repository@sha256:" + "a" * 64
    assert init["command"] == ["cp", "-R", "/model_repository/.", "/models/"]
    init_mount = next(m for m in init["volumeMounts"] if m["mountPath"] == "/models")
    triton_mount = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models")
    assert init_mount["name"] == triton_mount["name"] and triton_mount["readOnly"] is True
    assert flag_value(triton["args"], "--model-repository") == "/models"


def test_model_repository_from_a_pvc_is_mounted_read_only(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["model-repo-pvc"]))
    deployment = one(objects, "Deployment", "triton")
    triton = container(deployment, "triton")
    mount = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mount["subPath"] == "v1" and mount["readOnly"] is True
    assert "initContainers" not in deployment["spec"]["template"]["spec"]
    assert flag_value(triton["args"], "--model-repository") == "/models"


def test_model_repository_from_an_object_store_is_read_by_triton(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["model-repo-s3"]))
    deployment = one(objects, "Deployment", "triton")
    triton = container(deployment, "triton")
    assert flag_value(triton["args"], "--model-repository") == "s3://bucket/bgremove/models"
    assert triton["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "/models" not in {m["mountPath"] for m in triton["volumeMounts"]}
    # Triton downloads the repository into a temporary directory: /tmp must be writable.
    assert "/tmp" in {m["mountPath"] for m in triton["volumeMounts"]}

    objects, _ = render(chart, copy.deepcopy(SCENARIOS["model-repo-gcs"]))
    triton = container(one(objects, "Deployment", "triton"), "triton")
    env = {e["name"]: e.get("value") for e in triton["env"]}
    mount = next(m for m in triton["volumeMounts"] if m["name"] == "gcs-credentials")
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == mount["mountPath"] + "/key.json"


# --- Secrets, TLS and API keys --------------------------------------------------------------------


def _secrets(objects: list[Obj], component: str) -> list[Obj]:
    return [
        o
        for o in objects
        if o["kind"] == "Secret" and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]


def _secret_volume(deployment: Obj, mount_path: str) -> tuple[Obj, Obj]:
    gw = container(deployment, "gateway")
    mount = next(m for m in gw["volumeMounts"] if m["mountPath"] == mount_path)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    return mount, volume["secret"]


def test_tls_off_passes_insecure_and_nothing_else(chart: Chart) -> None:
    objects, notes = render(chart, {})
    args = container(one(objects, "Deployment", "gateway"), "gateway")["args"]
    assert "--insecure" in args
    assert not {"--tls-cert", "--tls-key", "--api-keys-file"} & set(args)
    assert not _secrets(objects, "gateway")
    assert "--insecure" in notes and "-plaintext" in notes
    assert "is plain HTTP" not in notes, "no TLS to contrast it with"


def test_tls_from_a_created_secret(chart: Chart) -> None:
    objects, notes = render(chart, copy.deepcopy(SCENARIOS["tls-created-secret"]))
    deployment = one(objects, "Deployment", "gateway")
    args = container(deployment, "gateway")["args"]
    assert "--insecure" not in args and "--tls-client-ca" not in args
    mount, secret = _secret_volume(deployment, "/etc/bgremove/tls")
    assert flag_value(args, "--tls-cert") == mount["mountPath"] + "/tls.crt"
    assert flag_value(args, "--tls-key") == mount["mountPath"] + "/tls.key"
    created = one(objects, "Secret", "gateway")
    assert created["type"] == "kubernetes.io/tls"
    assert secret["secretName"] == created["metadata"]["name"]
    assert base64.b64decode(created["data"]["tls.crt"]).decode() == PEM
    assert base64.b64decode(created["data"]["tls.key"]).decode() == KEY
    # A changed certificate rolls the pods.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    other, _ = render(chart, {"gateway": {"tls": {"enabled": True, "cert": PEM + "\n", "key": KEY}}})
    other_annotations = one(other, "Deployment", "gateway")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/tls"] != other_annotations["checksum/tls"]
    assert "-plaintext" not in notes and "-cacert" in notes
    assert "the HTTP API (gateway.http, port 8080) is plain HTTP" in notes


def test_existing_secrets_are_used_not_created(chart: Chart) -> None:
    objects, notes = render(chart, copy.deepcopy(SCENARIOS["existing-secrets-mtls"]))
    deployment = one(objects, "Deployment", "gateway")
    args = container(deployment, "gateway")["args"]
    assert not _secrets(objects, "gateway")
    tls_mount, tls_secret = _secret_volume(deployment, "/etc/bgremove/tls")
    assert tls_secret["secretName"] == "gw-cert"
    assert flag_value(args, "--tls-client-ca") == tls_mount["mountPath"] + "/ca.crt"
    keys_mount, keys_secret = _secret_volume(deployment, "/etc/bgremove/auth")
    assert keys_secret["secretName"] == "gw-keys"
    assert keys_secret["items"] == [{"key": "keys.json", "path": "keys.json"}]
    assert flag_value(args, "--api-keys-file") == keys_mount["mountPath"] + "/keys.json"
    assert "authorization: Bearer" in notes and "-cert client.crt" in notes


def test_api_keys_from_a_created_secret(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["created-api-keys"]))
    deployment = one(objects, "Deployment", "gateway")
    created = one(objects, "Secret", "gateway")
    _, secret = _secret_volume(deployment, "/etc/bgremove/auth")
    assert secret["secretName"] == created["metadata"]["name"]
    assert base64.b64decode(created["data"]["api-keys.json"]).decode() == '{"keys": []}'
    assert "checksum/api-keys" in deployment["spec"]["template"]["metadata"]["annotations"]


# --- Triton's admin key ---------------------------------------------------------------------------


def _admin_key(objects: list[Obj]) -> tuple[str, str]:
    """(Secret name, key in it) that Triton's TRITON_ADMIN_KEY comes from."""
    triton = container(one(objects, "Deployment", "triton"), "triton")
    (env,) = [e for e in triton["env"] if e["name"] == "TRITON_ADMIN_KEY"]
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_triton_admin_apis_need_the_key_that_triton_and_gateway_get(
    scenario: tuple[str, list[Obj], str],
) -> None:
    name, objects, _ = scenario
    secret_name, key = _admin_key(objects)
    args = container(one(objects, "Deployment", "triton"), "triton")["args"]
    grpc_apis, _, grpc_header = flag_value(args, "--grpc-restricted-protocol").partition(":")
    http_apis, _, http_header = flag_value(args, "--http-restricted-api").partition(":")
    # Kubernetes substitutes $(TRITON_ADMIN_KEY) from the container's environment: the key is in
    # no manifest, only in the Secret.
    assert grpc_header == http_header == f"{ADMIN_HEADER}=$(TRITON_ADMIN_KEY)"
    assert grpc_apis == http_apis
    apis = set(grpc_apis.split(","))
    assert apis >= set(ADMIN_PROTOCOLS) >= {"model-repository", "shared-memory"}, "model loading is closed"
    assert "health" not in apis, "the kubelet's probes carry no key"
    assert flag_value(args, "--model-control-mode") == "explicit"

    # The gateway reads the same Secret's key as a file (never an argument or variable).
    deployment = one(objects, "Deployment", "gateway")
    gw = container(deployment, "gateway")
    mount, secret = _secret_volume(deployment, "/etc/bgremove/triton-admin")
    assert mount["readOnly"] is True
    assert secret["secretName"] == secret_name and secret["items"] == [{"key": key, "path": key}]
    assert flag_value(gw["args"], "--triton-admin-key-file") == f"{mount['mountPath']}/{key}"
    assert not [e for e in gw["env"] if "ADMIN" in e["name"]]

    created = _secrets(objects, "triton")
    if name == "existing-admin-key":
        assert (secret_name, key) == ("triton-admin", "key") and not created
        assert "statistics" in apis
    else:
        (generated,) = created
        assert generated["metadata"]["name"] == secret_name
        assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(generated["data"][key]).decode())


def test_generated_admin_key_is_random_and_kept_across_upgrades(chart: Chart, tmp_path: Path) -> None:
    def key_of(objects: list[Obj]) -> str:
        (secret,) = _secrets(objects, "triton")
        return base64.b64decode(secret["data"]["admin-key"]).decode()

    first, second = key_of(render(chart, {})[0]), key_of(render(chart, {})[0])
    assert first != second, "offline (no earlier release to look up) every render makes a new key"

    # An upgrade finds the release's Secret with helm's lookup and keeps its key. Offline, lookup
    # answers nothing, so a copy of the chart stands the earlier Secret in for it.
    template = tmp_path / "bgremove" / "templates" / "triton" / "secret-admin-key.yaml"
    shutil.copytree(CHART_DIR, tmp_path / "bgremove")
    text = template.read_text()
    call = 'lookup "v1" "Secret" .Release.Namespace $name'
    assert text.count(call) == 1
    earlier = base64.b64encode(b"earlier-key").decode()
    template.write_text(text.replace(call, f'dict "data" (dict "admin-key" "{earlier}")'))
    with Chart.load(tmp_path / "bgremove") as upgraded:
        assert key_of(render(upgraded, {})[0]) == "earlier-key"


def test_only_triton_mounts_its_shared_memory(scenario: tuple[str, list[Obj], str]) -> None:
    """The Python backend makes its shared-memory regions (request tensors) 0644 whatever the umask:
    the pod is what keeps them private, so no other container may mount Triton's /dev/shm."""
    _, objects, _ = scenario
    pod = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    triton = container(one(objects, "Deployment", "triton"), "triton")
    (shm,) = [m["name"] for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    others = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] != "triton"]
    for other in others:
        assert shm not in {m["name"] for m in other.get("volumeMounts", [])}, other["name"]
    assert not pod.get("shareProcessNamespace"), "Triton's command line (with the key) stays its own"


# --- The gateway reads what the chart passes ------------------------------------------------------


# Flags of features other changes are adding to the gateway (HTTP API, --workers, shared limits):
# the chart passes them already. Once the gateway reads one, the tests check its value like any other.
PENDING_FLAGS = {"--http-listen": 1, "--http-ui": 0, "--workers": 1, "--limits-replicas": 1}


def _known_flags() -> set[str]:
    """Every flag `bgremove serve` reads."""
    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {flag for action in subcommands.choices["serve"]._actions for flag in action.option_strings}


def _without_pending(args: list[str]) -> list[str]:
    """`args` less the pending flags (and their values) the gateway does not read yet."""
    known, kept, skip = _known_flags(), [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in PENDING_FLAGS and arg not in known:
            skip = PENDING_FLAGS[arg]
        else:
            kept.append(arg)
    return kept


def _parse_gateway_command(gw: Obj, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """The real `bgremove` command line, reading the environment as it does in the pod (a variable
    from a Secret gets a stand-in value)."""
    assert gw["command"] == ["bgremove"] and gw["args"][0] == "serve"
    for name in [n for n in os.environ if n.startswith("BGREMOVE_")]:
        monkeypatch.delenv(name)
    for e in gw["env"]:
        if e["name"].startswith("BGREMOVE_"):
            monkeypatch.setenv(e["name"], e.get("value", "redis://stand-in:6379/0"))
    return build_parser().parse_known_args(_without_pending(gw["args"]))


def test_gateway_flags_are_ones_it_reads(
    scenario: tuple[str, list[Obj], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects, _ = scenario
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    ns, unknown = _parse_gateway_command(gw, monkeypatch)
    assert unknown == []
    tls = "--tls-cert" in gw["args"]
    assert (ns.tls_cert is not None, ns.tls_key is not None, ns.insecure) == (tls, tls, not tls)
    if "--health-listen" in gw["args"]:
        assert ns.health_listen == flag_value(gw["args"], "--health-listen")
    if "--api-keys-file" in gw["args"]:
        assert str(ns.api_keys_file) == flag_value(gw["args"], "--api-keys-file")
    assert ns.triton_urls == [flag_value(gw["args"], "--triton-url")]
    assert str(ns.triton_admin_key_file) == flag_value(gw["args"], "--triton-admin-key-file")
    assert ns.listen == flag_value(gw["args"], "--listen")
    assert ns.drain_seconds == float(flag_value(gw["args"], "--drain-seconds"))
    triton = container(one(objects, "Deployment", "triton"), "triton")
    assert ns.default_model == flag_value(gw["args"], "--default-model")
    assert ns.default_model in loaded_models(triton["args"])
    # The listeners the Services and NetworkPolicies point at (empty: off).
    assert (ns.metrics_listen or "") == flag_value(gw["args"], "--metrics-listen")
    known = _known_flags()
    if "--http-listen" in known:
        assert (ns.http_listen or "") == flag_value(gw["args"], "--http-listen")
        assert ns.http_ui == ("--http-ui" in gw["args"])
    if "--workers" in known:
        assert ns.workers == int(flag_value(gw["args"], "--workers"))


def test_default_model_is_a_value(chart: Chart, monkeypatch: pytest.MonkeyPatch) -> None:
    objects, _ = render(chart, {"gateway": {"defaultModel": "u2netp"}, "triton": {"models": ["u2netp"]}})
    ns, _ = _parse_gateway_command(container(one(objects, "Deployment", "gateway"), "gateway"), monkeypatch)
    assert ns.default_model == "u2netp"
    triton = container(one(objects, "Deployment", "triton"), "triton")
    assert loaded_models(triton["args"]) == ["u2netp"]


def test_gateway_environment_is_what_it_reads(chart: Chart, monkeypatch: pytest.MonkeyPatch) -> None:
    # Values away from the gateway's own defaults, so a renamed variable cannot pass unnoticed.
    values = {
        "gateway": {
            "logLevel": "DEBUG",
            "cpuWorkers": 3,
            "drainSeconds": 20,
            "limits": {"maxUploadBytes": 10_000_000, "maxPixels": 1_000_000},
        }
    }
    objects, _ = render(chart, values)
    ns, _ = _parse_gateway_command(container(one(objects, "Deployment", "gateway"), "gateway"), monkeypatch)
    assert ns.max_upload_bytes == 10_000_000
    assert ns.max_pixels == 1_000_000
    assert ns.cpu_workers == 3
    assert ns.log_level == "DEBUG"
    assert ns.drain_seconds == 20


def test_opentelemetry_reaches_gateway_and_triton(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["load-balancer-otel"]))
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    env = {e["name"]: e.get("value") for e in gw["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318/"
    assert env["OTEL_SERVICE_NAME"] == "bgremove-gateway"
    args = container(one(objects, "Deployment", "triton"), "triton")["args"]
    traces = [a.split("=", 1)[1] for a in args if a.startswith("--trace-config=")]
    assert "mode=opentelemetry" in traces
    # rate=0: Triton traces exactly the requests that arrive with the gateway's traceparent.
    assert "rate=0" in traces
    assert "opentelemetry,url=http://otel-collector.observability.svc:4318/v1/traces" in traces
    objects, _ = render(chart, {})
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    assert not [e for e in gw["env"] if e["name"].startswith("OTEL_")]
    args = container(one(objects, "Deployment", "triton"), "triton")["args"]
    assert not [a for a in args if a.startswith("--trace-config")]


def test_notes_explain_how_to_call_the_service(chart: Chart) -> None:
    objects, notes = render(chart, {})
    service = one(objects, "Service", "gateway")["metadata"]["name"]
    assert f"port-forward service/{service} 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 list" in notes
    assert "bgremove.v1.BackgroundRemoval/RemoveBackground" in notes
    assert "grpc.health.v1.Health/Check" in notes


# --- values.schema.json -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gateway": {"replicaCount": "three"}}, "/gateway/replicaCount"),
        ({"gateway": {"port": 70000}}, "/gateway/port"),
        ({"gateway": {"tls": {"enabled": "yes"}}}, "/gateway/tls/enabled"),
        ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
        ({"gateway": {"replicas": 3}}, "additional properties 'replicas' not allowed"),
        ({"gateway": {"image": {"digest": "latest"}}}, "/gateway/image/digest"),
        ({"gateway": {"limits": {"maxUploadBytes": -1}}}, "/gateway/limits/maxUploadBytes"),
        ({"triton": {"profile": "tpu"}}, "/triton/profile"),
        ({"triton": {"models": []}}, "/triton/models"),
        ({"gateway": {"defaultModel": "../u2net"}}, "/gateway/defaultModel"),
        ({"triton": {"resources": {"requests": {"cpu": "lots"}}}}, "/triton/resources/requests/cpu"),
        ({"modelRepository": {"source": "ftp"}}, "/modelRepository/source"),
        ({"otel": {"endpoint": "otel-collector:4318"}}, "/otel/endpoint"),
        ({"triton": {"adminKey": {"restrictedApis": ["health"]}}}, "/triton/adminKey/restrictedApis/0"),
        ({"triton": {"adminKey": {"restrictedApis": []}}}, "/triton/adminKey/restrictedApis"),
        ({"triton": {"adminKey": {"existingSecretKey": "a/b"}}}, "/triton/adminKey/existingSecretKey"),
        (
            {"gateway": {"topologySpread": {"hostname": {"nodeTaintsPolicy": "Always"}}}},
            "/gateway/topologySpread/hostname/nodeTaintsPolicy",
        ),
        (
            {"triton": {"topologySpread": {"zone": {"nodeAffinityPolicy": "honor"}}}},
            "/triton/topologySpread/zone/nodeAffinityPolicy",
        ),
        ({"gateway": {"workers": 0}}, "/gateway/workers"),
        ({"gateway": {"limits": {"redis": {"url": "http://redis:6379"}}}}, "/gateway/limits/redis/url"),
        ({"gateway": {"limits": {"replicas": 0}}}, "/gateway/limits/replicas"),
        ({"gateway": {"http": {"port": 0}}}, "/gateway/http/port"),
        ({"gateway": {"metrics": {"enabled": "yes"}}}, "/gateway/metrics/enabled"),
        ({"gateway": {"sidecars": [{"image": "x"}]}}, "/gateway/sidecars/0"),
        ({"triton": {"extraVolumeMounts": [{"name": "x"}]}}, "/triton/extraVolumeMounts/0"),
        ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "/metrics/serviceMonitor/interval"),
        ({"metrics": {"podMonitor": {"labels": {"release": 1}}}}, "/metrics/podMonitor/labels/release"),
        ({"grafana": {"dashboard": {"namespace": "Monitoring"}}}, "/grafana/dashboard/namespace"),
        ({"gateway": {"networkPolicy": {"egress": {"dnsTo": []}}}}, "/gateway/networkPolicy/egress/dnsTo"),
        ({"openshift": "true"}, "/openshift"),
        ({"tests": {"apiKey": {"existingSecretKey": "a/b"}}}, "/tests/apiKey/existingSecretKey"),
    ],
)
def test_schema_rejects_wrong_values(chart: Chart, values: Obj, where: str) -> None:
    with pytest.raises(HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        # null deletes a default, as `--set key=null` does.
        ({"gateway": {"image": {"repository": None}}}, "'/gateway/image': missing property 'repository'"),
        ({"triton": {"models": None}}, "'/triton': missing property 'models'"),
        ({"gateway": None}, "missing property 'gateway'"),
        # Required only together with another value.
        ({"triton": {"profile": "cpu"}}, "/triton/cpuImage/repository"),
        ({"gateway": {"tls": {"enabled": True}}}, "/gateway/tls/cert"),
        (
            {"gateway": {"tls": {"enabled": True, "cert": PEM, "key": KEY, "clientAuth": True}}},
            "/gateway/tls/clientCA",
        ),
        ({"gateway": {"auth": {"enabled": True}}}, "/gateway/auth/apiKeysJson"),
        ({"modelRepository": {"source": "pvc"}}, "/modelRepository/pvc/claimName"),
        ({"modelRepository": {"source": "objectStore", "objectStore": {"uri": "/mnt/models"}}}, "uri"),
    ],
)
def test_schema_rejects_missing_required_values(chart: Chart, values: Obj, where: str) -> None:
    with pytest.raises(HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- Dockerfile -------------------------------------------------------------------------------------


def _dockerfile_stages() -> list[dict[str, list[str]]]:
    """Instructions per stage (continuation lines joined, comments dropped, ARGs substituted)."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[dict[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.strip())
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if instruction == "FROM":
            stages.append({})
        stages[-1].setdefault(instruction, []).append(rest)
    return stages


def _final_stage(stages: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    return stages[-1]


def _stage(stages: list[dict[str, list[str]]], alias: str) -> dict[str, list[str]]:
    return next(st for st in stages if st["FROM"][0].endswith(f" AS {alias}"))


def _non_root(user: str) -> bool:
    # Numeric, so the kubelet can verify runAsNonRoot without reading the image's /etc/passwd.
    return re.fullmatch(r"[1-9]\d*:[1-9]\d*", user) is not None


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    names = set()
    for stage in stages:
        image, _, alias = stage["FROM"][0].partition(" AS ")
        if image not in names:
            # An exact version tag (no "latest", no bare major) and the digest of that image.
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", image), image
        names.add(alias.strip())
    final = _final_stage(stages)
    assert final["FROM"][0].endswith(" AS runtime"), "the gateway is the default target"
    assert _non_root(final["USER"][-1])
    # Only the virtualenv comes across; no package manager or compiler runs in the final stage.
    assert final["COPY"] == ["--from=build /opt/venv /opt/venv"]
    for command in final.get("RUN", []):
        assert not re.search(r"apt-get|apk |pip |gcc|g\+\+|make|build-essential|-dev\b", command), command
    assert final["ENTRYPOINT"] == ['["bgremove"]']
    # The build stage proves the generated stubs are inside the installed package.
    build = stages[0]
    assert any("from bgremove.v1 import bgremove_pb2, bgremove_pb2_grpc" in r for r in build["RUN"])
    assert any("--only-binary=:all:" in r for r in build["RUN"]), "wheels only: no compiler needed"


def test_model_repository_image_holds_what_the_init_container_copies(chart: Chart) -> None:
    stages = _dockerfile_stages()
    # The graph is generated inside the build, from the verified weights, as `make models` does.
    assert any(
        "bgremove prepare-models --model-repository /src/model_repository" in r
        for r in _stage(stages, "models")["RUN"]
    )
    image = _stage(stages, "model-repository")
    assert image["COPY"] == ["--from=models /src/model_repository /model_repository"]
    assert _non_root(image["USER"][-1])
    objects, _ = render(chart, {})
    init = container(one(objects, "Deployment", "triton"), "model-repository")
    assert init["command"][:3] == ["cp", "-R", "/model_repository/."]
    assert init["image"].startswith("bgremove-model-repository:")


def test_dockerignore_keeps_the_context_to_what_images_need() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: nothing enters the build context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for stage in _dockerfile_stages()
        for copy_args in stage.get("COPY", [])
        if not copy_args.startswith("--from")
        for src in copy_args.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    assert not {".venv", ".git", "tests", "benchmarks"} & allowed


def test_chart_port_matches_the_image() -> None:
    exposed = _final_stage(_dockerfile_stages())["EXPOSE"]
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert exposed == [str(values["gateway"]["port"])]


# --- Scheduling ---------------------------------------------------------------------------------


def test_spread_policies_and_skew_are_values(chart: Chart) -> None:
    spread = {
        "zone": {"maxSkew": 2, "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "Ignore"},
        "hostname": {"whenUnsatisfiable": "ScheduleAnyway", "nodeAffinityPolicy": "Ignore"},
    }
    objects, _ = render(chart, {"gateway": {"topologySpread": copy.deepcopy(spread)}})
    pod = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    keys = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    zone, host = keys["topology.kubernetes.io/zone"], keys["kubernetes.io/hostname"]
    assert (zone["maxSkew"], zone["whenUnsatisfiable"]) == (2, "DoNotSchedule")
    assert (zone["nodeTaintsPolicy"], zone["nodeAffinityPolicy"]) == ("Ignore", "Honor")
    assert (host["whenUnsatisfiable"], host["nodeAffinityPolicy"], host["nodeTaintsPolicy"]) == (
        "ScheduleAnyway",
        "Ignore",
        "Honor",
    )
    # Triton's are its own.
    triton = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    assert all(c["nodeTaintsPolicy"] == "Honor" for c in triton["topologySpreadConstraints"])


def test_triton_runtime_class(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["extra-containers"]))
    assert one(objects, "Deployment", "triton")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    objects, _ = render(chart, {})
    assert "runtimeClassName" not in one(objects, "Deployment", "triton")["spec"]["template"]["spec"]


# --- Security contexts and OpenShift --------------------------------------------------------------


def test_openshift_leaves_ids_to_the_scc(chart: Chart) -> None:
    default, _ = render(chart, {})
    objects, _ = render(chart, {"openshift": True})
    for component in ("gateway", "triton"):
        before = one(default, "Deployment", component)["spec"]["template"]["spec"]
        after = one(objects, "Deployment", component)["spec"]["template"]["spec"]
        dropped = {k: v for k, v in before["securityContext"].items() if k not in after["securityContext"]}
        assert set(dropped) == {"runAsUser", "runAsGroup", "fsGroup"}, component
        assert after["securityContext"]["runAsNonRoot"] is True
        for c, c_before in zip(after["containers"], before["containers"], strict=True):
            assert c["securityContext"] == c_before["securityContext"]
    (test_pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert "runAsUser" not in test_pod["spec"]["securityContext"]


def test_security_contexts_are_values(chart: Chart) -> None:
    # Helm merges a map given with the default one: null removes a default key (the documented way
    # to drop an id without openshift: true).
    pod_sc = {
        "runAsUser": 1001,
        "fsGroup": None,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "x"},
    }
    objects, _ = render(
        chart,
        {
            "gateway": {"podSecurityContext": copy.deepcopy(pod_sc)},
            "triton": {"securityContext": {"runAsUser": 2000}},
        },
    )
    gateway = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert gateway["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1001,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "x"},
    }
    triton = one(objects, "Deployment", "triton")
    assert container(triton, "triton")["securityContext"]["runAsUser"] == 2000
    # The model-repository init container runs in Triton's pod, under Triton's container context.
    assert container(triton, "model-repository")["securityContext"]["runAsUser"] == 2000


# --- Containers, volumes and variables of the user's own ---------------------------------------


def test_extra_containers_volumes_and_variables(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["extra-containers"]))
    gateway = one(objects, "Deployment", "gateway")
    pod = gateway["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["gateway", "proxy"]
    assert [c["name"] for c in pod["initContainers"]] == ["wait"]
    gw = container(gateway, "gateway")
    assert {"name": "EXTRA", "value": "1"} in gw["env"]
    assert {"name": "extra", "mountPath": "/etc/extra", "readOnly": True} in gw["volumeMounts"]
    assert {"name": "extra", "secret": {"secretName": "extra"}} in pod["volumes"]
    triton = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    assert [c["name"] for c in triton["containers"]] == ["triton", "exporter"]
    # The model repository is copied first: a user's init container may read it.
    assert [c["name"] for c in triton["initContainers"]] == ["model-repository", "warm"]
    objects, _ = render(
        chart, {**copy.deepcopy(SCENARIOS["model-repo-pvc"]), "triton": {"initContainers": []}}
    )
    assert "initContainers" not in one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    objects, _ = render(
        chart,
        {
            **copy.deepcopy(SCENARIOS["model-repo-pvc"]),
            "triton": {"initContainers": [{"name": "warm", "image": "busybox:1"}]},
        },
    )
    triton = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    assert [c["name"] for c in triton["initContainers"]] == ["warm"]


# --- Gateway processes (--workers) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway", "workers"),
    [
        ({}, 1),  # the default request, "1"
        ({"resources": {"requests": {"cpu": "500m"}}}, 1),
        ({"resources": {"requests": {"cpu": "100m"}}}, 1),
        ({"resources": {"requests": {"cpu": "2"}}}, 2),
        ({"resources": {"requests": {"cpu": "2500m"}}}, 3),
        ({"resources": {"requests": {"cpu": 1.5}}}, 2),
        ({"resources": {"requests": {"cpu": 4}}}, 4),
        ({"resources": {"requests": {"cpu": None}}}, 1),
        ({"resources": {"requests": {"cpu": "3"}}, "workers": 2}, 2),  # an explicit count wins
    ],
)
def test_workers_follow_the_cpu_request(
    chart: Chart, gateway: Obj, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, _ = render(chart, {"gateway": copy.deepcopy(gateway)})
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    assert flag_value(gw["args"], "--workers") == str(workers)
    if "--workers" in _known_flags():
        ns, _ = _parse_gateway_command(gw, monkeypatch)
        assert ns.workers == workers


# --- Listeners: HTTP API and metrics --------------------------------------------------------------


def test_http_api_listens_on_the_pod_and_the_service(chart: Chart) -> None:
    objects, _ = render(chart, {"gateway": {"http": {"port": 8088, "ui": True}}})
    gateway = one(objects, "Deployment", "gateway")
    gw = container(gateway, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert flag_value(gw["args"], "--http-listen") == f"0.0.0.0:{ports['http']}" == "0.0.0.0:8088"
    assert "--http-ui" in gw["args"]
    service = one(objects, "Service", "gateway")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert (http["port"], http["targetPort"]) == (8088, "http")
    # Probes stay on gRPC health: the HTTP API is not what readiness means.
    assert "grpc" in gw["readinessProbe"]
    objects, _ = render(chart, {})
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    assert flag_value(gw["args"], "--http-listen") == "0.0.0.0:8080" and "--http-ui" not in gw["args"]


def test_listeners_turned_off_listen_nowhere(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["listeners-off"]))
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    # Empty, not absent: the gateway's own defaults would listen on loopback.
    assert flag_value(gw["args"], "--http-listen") == ""
    assert flag_value(gw["args"], "--metrics-listen") == ""
    assert {p["name"] for p in gw["ports"]} == {"grpc"}
    assert [p["name"] for p in one(objects, "Service", "gateway")["spec"]["ports"]] == ["grpc"]
    assert not [o for o in objects if o["kind"] == "Service" and "gateway-metrics" in str(o["metadata"])]
    assert not [o for o in objects if o["kind"] == "Pod"]


def test_gateway_metrics_listen_where_the_service_points(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, _ = render(chart, {"gateway": {"metrics": {"port": 9100}}})
    gateway = one(objects, "Deployment", "gateway")
    gw = container(gateway, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert flag_value(gw["args"], "--metrics-listen") == f"0.0.0.0:{ports['metrics']}" == "0.0.0.0:9100"
    ns, _ = _parse_gateway_command(gw, monkeypatch)
    assert ns.metrics_listen == "0.0.0.0:9100"
    metrics = one(objects, "Service", "gateway-metrics")
    assert metrics["spec"]["clusterIP"] == "None", "headless: every pod is a target"
    assert selects(metrics["spec"]["selector"], pod_labels(gateway))
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"}
    ]
    # Not on the API Service, which may be a LoadBalancer.
    assert "metrics" not in {p["name"] for p in one(objects, "Service", "gateway")["spec"]["ports"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"http": {"port": 50051}}}, "the gateway's ports must differ"),
        ({"gateway": {"metrics": {"port": 8080}}}, "8080, 8080"),
        (
            {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
            "would scrape every pod twice",
        ),
        (
            {"gateway": {"tls": {"enabled": True, "existingSecret": "x", "clientAuth": True}}},
            "needs tests.tls.clientSecret",
        ),
    ],
)
def test_new_values_that_contradict_fail_with_a_clear_message(
    chart: Chart, values: Obj, message: str
) -> None:
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- Scraping --------------------------------------------------------------------------------------


def _service_with_port(objects: list[Obj], match_labels: dict[str, str], port: str) -> Obj:
    """The one Service a monitor's selector picks, which must have the named port."""
    services = [
        o for o in objects if o["kind"] == "Service" and selects(match_labels, o["metadata"]["labels"])
    ]
    assert len(services) == 1, [s["metadata"]["name"] for s in services]
    assert port in {p["name"] for p in services[0]["spec"]["ports"]}
    return services[0]


@pytest.mark.parametrize("scenario_name", ["monitoring", "pod-monitor"])
def test_monitors_select_the_metrics_ports(chart: Chart, scenario_name: str) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS[scenario_name]))
    monitors = [o for o in objects if o["apiVersion"].startswith(f"{MONITORING}/")]
    kind = "ServiceMonitor" if scenario_name == "monitoring" else "PodMonitor"
    assert sorted(m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors) == [
        "gateway",
        "triton",
    ]
    for monitor in monitors:
        check_monitor_shape(monitor)
        assert monitor["kind"] == kind
        component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        deployment = one(objects, "Deployment", component)
        other = one(objects, "Deployment", "triton" if component == "gateway" else "gateway")
        pod_ports = {p["name"] for p in container(deployment, component)["ports"]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        if kind == "ServiceMonitor":
            assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            (endpoint,) = monitor["spec"]["endpoints"]
            service = _service_with_port(objects, selector, endpoint["port"])
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            assert selects(service["spec"]["selector"], pod_labels(deployment))
            assert port["targetPort"] in pod_ports
            assert endpoint["interval"] == "30s"
        else:
            (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
            assert selects(selector, pod_labels(deployment)) and not selects(selector, pod_labels(other))
            assert endpoint["port"] in pod_ports and endpoint["interval"] == "15s"
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert not [o for o in render(chart, {})[0] if o["apiVersion"].startswith(f"{MONITORING}/")]
    # A gateway without metrics leaves only Triton's.
    values = copy.deepcopy(SCENARIOS[scenario_name])
    values["gateway"] = {"metrics": {"enabled": False}}
    objects, _ = render(chart, values)
    monitors = [o for o in objects if o["apiVersion"].startswith(f"{MONITORING}/")]
    assert [m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors] == ["triton"]


def test_only_scrapers_reach_the_metrics_ports(chart: Chart) -> None:
    scrapers = [{"namespaceSelector": {"matchLabels": {"team": "observability"}}}]
    extra = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    objects, _ = render(
        chart,
        {
            "metrics": {"networkPolicy": {"from": scrapers}},
            "triton": {"networkPolicy": {"metricsFrom": extra}},
        },
    )
    gateway = _rules_by_port(one(objects, "NetworkPolicy", "gateway")["spec"])
    triton = _rules_by_port(one(objects, "NetworkPolicy", "triton")["spec"])
    assert gateway["metrics"] == [scrapers]
    assert triton["metrics"] == [scrapers + extra]
    for opened in (gateway, triton):
        for port, sources in opened.items():
            if port != "metrics":
                assert scrapers not in sources, port
    objects, _ = render(chart, {"metrics": {"networkPolicy": {"from": []}}})
    assert "metrics" not in _rules_by_port(one(objects, "NetworkPolicy", "gateway")["spec"])
    assert "metrics" not in _rules_by_port(one(objects, "NetworkPolicy", "triton")["spec"])


# --- Egress -----------------------------------------------------------------------------------------


def _egress_ports(rule: Obj) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def test_egress_reaches_dns_triton_collector_and_redis_only(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["egress"]))
    policy = one(objects, "NetworkPolicy", "gateway")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    rules = policy["egress"]
    triton = one(objects, "Deployment", "triton")
    by_ports = {frozenset(_egress_ports(r)): r for r in rules}
    assert set(by_ports) == {
        frozenset({(53, "UDP"), (53, "TCP")}),
        frozenset({(8001, "TCP")}),
        frozenset({(4318, "TCP")}),
        frozenset({(6380, "TCP")}),
    }
    dns = by_ports[frozenset({(53, "UDP"), (53, "TCP")})]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    (to_triton,) = by_ports[frozenset({(8001, "TCP")})]["to"]
    assert set(to_triton) == {"podSelector"} and selects(
        to_triton["podSelector"]["matchLabels"], pod_labels(triton)
    )
    # No peers given for the collector and Redis: their port, to any destination.
    assert "to" not in by_ports[frozenset({(4318, "TCP")})]
    objects, _ = render(
        chart,
        {
            "gateway": {
                "networkPolicy": {
                    "egress": {
                        "enabled": True,
                        "redisTo": [{"podSelector": {"matchLabels": {"app": "redis"}}}],
                        "redisPort": 7000,
                        "extraRules": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}],
                    }
                },
                "limits": {"redis": {"existingSecret": "redis"}},
            },
            "otel": {"endpoint": "https://collector.example"},
        },
    )
    rules = one(objects, "NetworkPolicy", "gateway")["spec"]["egress"]
    redis = next(r for r in rules if "ports" in r and _egress_ports(r) == {(7000, "TCP")})
    assert redis["to"] == [{"podSelector": {"matchLabels": {"app": "redis"}}}]
    assert any("ports" in r and _egress_ports(r) == {(443, "TCP")} for r in rules)
    assert {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]} in rules
    # Off by default: egress is not restricted at all.
    objects, _ = render(chart, {})
    policy = one(objects, "NetworkPolicy", "gateway")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy


# --- Shared per-key limits --------------------------------------------------------------------------


def test_shared_limits_url_comes_from_a_secret(chart: Chart, monkeypatch: pytest.MonkeyPatch) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["shared-limits"]))
    deployment = one(objects, "Deployment", "gateway")
    gw = container(deployment, "gateway")
    (env,) = [e for e in gw["env"] if e["name"] == "BGREMOVE_LIMITS_REDIS_URL"]
    ref = env["valueFrom"]["secretKeyRef"]
    (secret,) = [s for s in _secrets(objects, "gateway") if s["metadata"]["name"] == ref["name"]]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "redis://:secret@redis.cache.svc:6380/0"
    assert "secret@" not in str(deployment), "the password is in the Secret only"
    assert "checksum/limits-redis" in deployment["spec"]["template"]["metadata"]["annotations"]
    # Each gateway admits its share of a key's limits while Redis does not answer.
    assert flag_value(gw["args"], "--limits-replicas") == "3"
    if "--limits-replicas" in _known_flags():
        ns, _ = _parse_gateway_command(gw, monkeypatch)
        assert ns.limits_replicas == 3
        assert ns.limits_redis_url == "redis://stand-in:6379/0"


def test_shared_limits_with_an_autoscaler_count_the_most_replicas(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["shared-limits-hpa"]))
    gw = container(one(objects, "Deployment", "gateway"), "gateway")
    assert flag_value(gw["args"], "--limits-replicas") == "12"
    (env,) = [e for e in gw["env"] if e["name"] == "BGREMOVE_LIMITS_REDIS_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
    assert not _secrets(objects, "gateway")
    values = copy.deepcopy(SCENARIOS["shared-limits-hpa"])
    values["gateway"]["limits"]["replicas"] = 5
    gw = container(one(render(chart, values)[0], "Deployment", "gateway"), "gateway")
    assert flag_value(gw["args"], "--limits-replicas") == "5"
    # Without Redis each gateway enforces the limits alone: neither the flag nor the variable.
    gw = container(one(render(chart, {})[0], "Deployment", "gateway"), "gateway")
    assert "--limits-replicas" not in gw["args"]
    assert not [e for e in gw["env"] if "REDIS" in e["name"]]


# --- helm test -------------------------------------------------------------------------------------


def _test_pod(objects: list[Obj]) -> Obj:
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    return pod


def test_helm_test_pod_calls_the_gateway_service(chart: Chart) -> None:
    objects, notes = render(chart, {})
    assert f"helm test {RELEASE} --namespace {NAMESPACE} --logs" in notes
    pod = _test_pod(objects)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    gateway = one(objects, "Deployment", "gateway")
    assert c["image"] == container(gateway, "gateway")["image"], "the gateway image has the client"
    assert c["command"][:2] == ["python", "-c"]
    script = (CHART_DIR / "files" / "helm-test.py").read_text()
    assert c["command"][2].strip() == script.strip()
    env = {e["name"]: e.get("value") for e in c["env"]}
    service = one(objects, "Service", "gateway")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    host = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert env == {"BGREMOVE_TEST_TARGET": f"{host}:{grpc_port['port']}"}
    # The gateway's NetworkPolicy lets it in.
    opened = _rules_by_port(one(objects, "NetworkPolicy", "gateway")["spec"])
    assert any(
        selects(peer.get("podSelector", {}).get("matchLabels", {}), pod["metadata"]["labels"])
        and "namespaceSelector" not in peer
        for sources in opened["grpc"]
        for peer in sources
    )
    objects, notes = render(chart, {"tests": {"enabled": False}})
    assert not [o for o in objects if o["kind"] == "Pod"] and "helm test" not in notes


def test_helm_test_pod_speaks_tls_and_sends_a_key(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["existing-secrets-mtls"]))
    pod = _test_pod(objects)
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v["secret"] for v in pod["spec"]["volumes"]}
    assert env["BGREMOVE_TEST_TLS"]["value"] == "1"
    # The CA: the gateway's TLS Secret's ca.crt unless another Secret is named; optional.
    assert env["BGREMOVE_TEST_CA_FILE"]["value"] == f"{mounts['ca']}/ca.crt"
    assert volumes["ca"]["secretName"] == "gw-cert" and volumes["ca"]["optional"] is True
    assert env["BGREMOVE_TEST_CLIENT_CERT_FILE"]["value"] == f"{mounts['client']}/tls.crt"
    assert env["BGREMOVE_TEST_CLIENT_KEY_FILE"]["value"] == f"{mounts['client']}/tls.key"
    assert volumes["client"]["secretName"] == "test-client-cert"
    assert env["BGREMOVE_TEST_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "test-key", "key": "api-key"}
    # Keys on but none to test with: the test checks that a call without a key is refused.
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["created-api-keys"]))
    env = {e["name"]: e.get("value") for e in _test_pod(objects)["spec"]["containers"][0]["env"]}
    assert env["BGREMOVE_TEST_EXPECT_UNAUTHENTICATED"] == "1" and "BGREMOVE_TEST_API_KEY" not in env
    objects, _ = render(
        chart,
        {
            "gateway": {"tls": {"enabled": True, "existingSecret": "gw-cert"}},
            "tests": {"tls": {"caSecret": "corp-ca", "caKey": "root.pem", "serverName": "bgremove.example"}},
        },
    )
    pod = _test_pod(objects)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["BGREMOVE_TEST_SERVER_NAME"] == "bgremove.example"
    (ca,) = pod["spec"]["volumes"]
    assert ca["secret"]["secretName"] == "corp-ca"
    assert ca["secret"]["items"] == [{"key": "root.pem", "path": "ca.crt"}]


# --- Grafana dashboard ------------------------------------------------------------------------------

DASHBOARD = CHART_DIR / "dashboards" / "bgremove.json"


def dashboard_expressions(dashboard: Obj) -> list[str]:
    """Every PromQL expression of the dashboard's panels, rows included."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_configmap_carries_the_sidecar_label(chart: Chart) -> None:
    objects, _ = render(chart, copy.deepcopy(SCENARIOS["monitoring"]))
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["bgremove.json"]) == json.loads(DASHBOARD.read_text())
    objects, _ = render(
        chart,
        {
            "grafana": {
                "dashboard": {
                    "enabled": True,
                    # null drops the default label, as `--set` with null does.
                    "labels": {"grafana_dashboard": None, "dashboards": "bgremove"},
                    "annotations": {"grafana_folder": "Imaging"},
                    "namespace": "monitoring",
                }
            }
        },
    )
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    kubernetes_validate.validate(configmap, latest_version(), strict=True)
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["dashboards"] == "bgremove"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Imaging"}
    assert not [o for o in render(chart, {})[0] if o["kind"] == "ConfigMap"]


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        box = p["gridPos"]
        assert box["x"] + box["w"] <= 24
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            # Every query is limited to the namespaces picked at the top.
            assert target["expr"].count("{") == target["expr"].count('namespace=~"$namespace"'), target[
                "expr"
            ]
    titles = " ".join(p["title"] for p in panels)
    for topic in ("Calls/s by code", "Step latency", "refusals", "Queue time", "Batch size", "replica"):
        assert topic in titles, topic
    expressions = " ".join(dashboard_expressions(dashboard))
    assert "histogram_quantile" in expressions and "bgremove_step_duration_seconds_bucket" in expressions
