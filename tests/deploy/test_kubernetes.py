"""deploy/kubernetes, rendered and checked: every overlay renders with ``kubectl kustomize``, every
object validates against the Kubernetes schemas (kubernetes-validate, strict, offline), the
KServe objects against KServe's own CRD schemas, and ports, probes, flags, users and volumes
against the server's real settings and the image recipe, so the manifests cannot drift from
the code."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import recipe
import yaml

from ferry.server.cli import build_parser
from ferry.server.grpc.app import INFERENCE_SERVICES
from ferry.server.probe import build_parser as build_probe_parser
from ferry.server.settings import Settings, from_args

KUBE = recipe.ROOT / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSION = "1.32.0"  # the oldest release whose API these manifests use (preStop sleep)
SCHEMAS = Path(__file__).parent / "kserve-schemas"
Obj = dict[str, Any]


@cache
def render(path: str) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were not rendered")
    r = subprocess.run(
        [kubectl, "kustomize", str(KUBE / path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [o for o in yaml.safe_load_all(r.stdout) if o]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@cache
def _entry() -> tuple[str, ...]:
    return tuple(recipe.exec_form(recipe.inherited(recipe.stages(), "serve", "ENTRYPOINT")))


def settings_of(container: Obj) -> Settings:
    """The settings the server would start with: the args through the server's own parser."""
    try:
        args = build_parser().parse_args(container["args"])
    except SystemExit:  # argparse printed the reason (an unknown flag, a bad value)
        pytest.fail(f"ferry serve refuses these args: {container['args']}")
    return from_args(args)


def deployments(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] == "Deployment")


def pods_of(objs: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    """(name, pod spec, ferry container) of every workload, the KServe runtime included."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            spec = o["spec"]["template"]["spec"]
            out.append((o["metadata"]["name"], spec, spec["containers"][0]))
        elif o["kind"] == "ServingRuntime":
            out.append((o["metadata"]["name"], o["spec"], o["spec"]["containers"][0]))
    return out


ALL = (*[f"overlays/{o}" for o in OVERLAYS], "kserve")


# ---- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_is_valid_kubernetes(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for obj in objs:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_is_strict_and_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_a: object, **_k: object) -> None:
        raise AssertionError("the validator tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    deployment = copy.deepcopy(one(render("overlays/dev"), "Deployment", "ferry-serving"))
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """KServe's CRD schemas as the API server's strict field validation reads them: an object
    with listed properties takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def kserve_schema(kind: str) -> tuple[str, Any]:
    name = {
        "ServingRuntime": "servingruntime-v1alpha1",
        "InferenceService": "inferenceservice-v1beta1",
    }
    doc = json.loads(gzip.decompress((SCHEMAS / f"{name[kind]}.json.gz").read_bytes()))
    return f"{doc['group']}/{doc['version']}", _strict(doc["schema"])


def test_the_kserve_objects_are_valid_against_kserve_crd_schemas() -> None:
    objs = render("kserve")
    assert sorted(o["kind"] for o in objs) == ["InferenceService", "ServingRuntime"]
    for obj in objs:
        api_version, schema = kserve_schema(obj["kind"])
        assert obj["apiVersion"] == api_version
        jsonschema.validate(obj, schema)
    # The schema is the strict one: an unknown field fails.
    bad = copy.deepcopy(one(objs, "ServingRuntime", "ferry"))
    bad["spec"]["protocolVersion"] = ["grpc-v2"]
    with pytest.raises(jsonschema.ValidationError, match="protocolVersion"):
        jsonschema.validate(bad, kserve_schema("ServingRuntime")[1])


def test_the_serving_runtime_is_onnx_over_grpc_v2_on_an_h2c_port() -> None:
    objs = render("kserve")
    runtime = one(objs, "ServingRuntime", "ferry")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    container = spec["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe injects storage into
    settings = settings_of(container)
    assert settings.repository == Path("/mnt/models")  # KServe's model mount
    (port,) = container["ports"]  # Knative: one port
    assert port["name"] == "h2c" and port["containerPort"] == settings.port
    isvc = one(objs, "InferenceService", "ferry-mlp")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in spec["supportedModelFormats"]]
    assert model["protocolVersion"] in spec["protocolVersions"]


def test_the_inference_service_storage_is_the_repository_ferry_serves() -> None:
    """A pvc:// URI is mounted at /mnt/models with its path as subPath: it must name the claim
    and folder the control plane writes the repository to."""
    model = one(render("kserve"), "InferenceService", "ferry-mlp")["spec"]["predictor"]["model"]
    uri = model["storageUri"]
    assert uri.startswith("pvc://")
    claim, _, folder = uri.removeprefix("pvc://").partition("/")
    base = render("overlays/production")
    one(base, "PersistentVolumeClaim", claim)
    control = one(base, "Deployment", "ferry-control")["spec"]["template"]["spec"]
    (mount,) = [
        m
        for m in control["containers"][0]["volumeMounts"]
        if _claim_of(control, m["name"]) == claim
    ]
    repository = settings_of(control["containers"][0]).repository
    assert repository == Path(mount["mountPath"]) / folder


def _claim_of(pod_spec: Obj, volume: str) -> str | None:
    for v in pod_spec.get("volumes", []):
        if v["name"] == volume and "persistentVolumeClaim" in v:
            return str(v["persistentVolumeClaim"]["claimName"])
    return None


# ---- the manifests against the server's settings and the image ----------------------------------


@pytest.mark.parametrize("path", ALL)
def test_every_flag_parses_with_the_servers_own_settings(path: str) -> None:
    """Unknown flags, wrong types and broken rules (management on 0.0.0.0 without a token) all
    fail here, as they would fail the pod's start."""
    for name, _spec, container in pods_of(render(path)):
        assert "command" not in container, f"{name}: keep the image's entry point"
        flags = {a.split("=", 1)[0] for a in container["args"]}
        assert "--workers" not in flags  # not a flag yet (issue 11, item 1)
        settings_of(container)


def reachable_listeners(s: Settings) -> set[int]:
    """The ports the settings open on an address other pods reach (gRPC and HTTP alike)."""
    by_host = [
        (s.host, (s.port, s.http_port)),
        (s.management_host, (s.management_port, s.management_http_port)),
        (s.metrics_host, (s.metrics_port,)),
    ]
    return {
        port
        for host, ports in by_host
        if host not in ("127.0.0.1", "localhost")
        for port in ports
        if port >= 0
    }


@pytest.mark.parametrize("path", ALL)
def test_ports_match_the_listeners_the_settings_open(path: str) -> None:
    for name, _spec, container in pods_of(render(path)):
        s = settings_of(container)
        listening = reachable_listeners(s)
        declared = {p["containerPort"] for p in container.get("ports", [])}
        assert declared, name
        assert declared <= listening, f"{name}: declares {declared}, listens on {listening}"
        # Nothing listens that the manifests do not route (metrics aside: Knative allows one
        # port, and Prometheus scrapes the pod's address).
        undeclared = listening - declared - {s.metrics_port}
        assert not undeclared, f"{name}: listens on {undeclared}, which no port declares"
        if s.management_port >= 0:
            assert s.management_port == Settings.management_port, name
        assert s.metrics_port in (Settings.metrics_port, -1), name


def _probe_args(probe: Obj) -> Any:
    command = probe["exec"]["command"]
    assert command[:3] == [_entry()[0], "-m", "ferry.server.probe"], "the image's python"
    return build_probe_parser().parse_args(command[3:])


@pytest.mark.parametrize("path", ALL)
def test_probes_ask_health_names_the_server_registers_on_its_listeners(path: str) -> None:
    for name, _spec, container in pods_of(render(path)):
        s = settings_of(container)
        ready, live = container["readinessProbe"], container["livenessProbe"]
        # Readiness: the replica's own health ("" = required models ready), on the port the
        # server binds it to.
        if "grpc" in ready:
            assert ready["grpc"]["port"] == s.port, name
            assert ready["grpc"].get("service", "") in ("", *INFERENCE_SERVICES)
        else:
            args = _probe_args(ready)
            assert not args.alive, f"{name}: readiness must not pass on NOT_SERVING"
            assert args.service in ("", *INFERENCE_SERVICES)
            _check_probe_target(name, s, args)
        # Liveness: answers at all, so a model loading never restarts the pod.
        args = _probe_args(live)
        assert args.alive, f"{name}: liveness must pass while models load"
        _check_probe_target(name, s, args)


def _check_probe_target(name: str, s: Settings, args: Any) -> None:
    host, _, port = args.address.rpartition(":")
    assert host == "127.0.0.1", "exec probes run inside the pod"
    if int(port) == s.port:
        assert args.token_file is None or str(args.token_file) == s.inference_token_file
    else:
        assert int(port) == s.management_port, f"{name}: {args.address} is no listener"
        assert str(args.token_file) == s.management_token_file, "management health needs it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_the_servers_grace_period(overlay: str) -> None:
    for d in deployments(render(f"overlays/{overlay}")):
        spec = d["spec"]["template"]["spec"]
        container = spec["containers"][0]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        needed = settings_of(container).grace_period + pre_stop.get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > needed, d["metadata"]["name"]


@pytest.mark.parametrize("path", ALL)
def test_pods_run_as_the_images_user_on_a_read_only_root(path: str) -> None:
    uid, _, gid = (recipe.inherited(recipe.stages(), "serve", "USER") or "").partition(":")
    for name, spec, container in pods_of(render(path)):
        ctx = spec.get("securityContext", {}) | container.get("securityContext", {})
        assert ctx["runAsNonRoot"] is True, name
        assert (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) == (uid, gid), name
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}: a writable /tmp on the read-only root"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_repository_is_written_by_control_and_read_only_for_serving(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    pvc = one(objs, "PersistentVolumeClaim", "ferry-repository")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, writes in (("ferry-control", True), ("ferry-serving", False)):
        spec = one(objs, "Deployment", name)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        s = settings_of(container)
        (mount,) = [m for m in container["volumeMounts"] if _claim_of(spec, m["name"])]
        assert _claim_of(spec, mount["name"]) == "ferry-repository"
        assert Path(mount["mountPath"]) in s.repository.parents, name
        assert mount.get("readOnly", False) is not writes, name
        if not writes:
            assert (s.management_port, s.management_http_port) == (-1, -1), (
                "serving replicas change nothing on disk"
            )
            assert s.poll_interval > 0, "serving replicas poll for what control publishes"
        else:
            assert s.state_dir and Path(mount["mountPath"]) in Path(s.state_dir).parents
    control = one(objs, "Deployment", "ferry-control")["spec"]
    assert control["replicas"] == 1 and control["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_and_pdb_select_the_serving_pods(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    serving = one(objs, "Deployment", "ferry-serving")
    labels = serving["spec"]["template"]["metadata"]["labels"]
    container = serving["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name, headless in (("ferry", False), ("ferry-headless", True)):
        svc = one(objs, "Service", name)
        assert svc["spec"]["selector"].items() <= labels.items()
        assert (svc["spec"].get("clusterIP") == "None") is headless
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert ports[grpc_port["targetPort"]] == settings_of(container).port
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    pdb = one(objs, "PodDisruptionBudget", "ferry-serving")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpas = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    if hpas:
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"]["name"] == "ferry-serving"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "cpu" in container["resources"]["requests"], "CPU utilization needs a request"
        assert "replicas" not in serving["spec"], "the HPA owns the replica count"
    else:
        assert serving["spec"]["replicas"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_management_port_is_private_and_its_token_comes_from_a_secret(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    control = one(objs, "Deployment", "ferry-control")
    spec = control["spec"]["template"]["spec"]
    s = settings_of(spec["containers"][0])
    policy = one(objs, "NetworkPolicy", "ferry-control")
    pod_labels = control["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = [
        r for r in policy["spec"]["ingress"] if s.management_port in {p["port"] for p in r["ports"]}
    ]
    assert rules and all(r.get("from") for r in rules), "management reachable from anywhere"
    for r in rules:
        for peer in r["from"]:
            assert peer["podSelector"].get("matchLabels"), "only labelled clients"
    # The token file lies in a Secret volume; the Secret itself is in git only for dev.
    token_dir = str(Path(s.management_token_file).parent)
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == token_dir]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    secrets = [o for o in objs if o["kind"] == "Secret"]
    if overlay == "dev":
        assert [o["metadata"]["name"] for o in secrets] == [secret_name]
    else:
        assert secrets == [], "production tokens are created out of band, never in git"
    # No serving replica listens on management, over gRPC or HTTP.
    serving = one(objs, "Deployment", "ferry-serving")["spec"]["template"]["spec"]
    s = settings_of(serving["containers"][0])
    assert (s.management_port, s.management_http_port) == (-1, -1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_pin_their_images(overlay: str) -> None:
    for _name, _spec, container in pods_of(render(f"overlays/{overlay}")):
        image = container["image"]
        assert ":" in image or "@sha256:" in image, image
        assert not image.endswith(":latest"), image
