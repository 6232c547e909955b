"""deploy/kubernetes: every variant (the fleet, with S3, with the inference gateway) is valid against the
Kubernetes schemas (kubernetes-validate, offline) and the ServiceMonitor CRD's, and agrees with the code and
the image: port, probe routes, user id, volume paths, settings, the metric names the picker reads."""

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfiles import REPO, Instruction, env_assignments, final_stage
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from manifests import Obj, build, one, pod_spec, used_features

from loraplex.cli import build_parser
from loraplex.settings import Settings
from server.app import create_app

K8S = REPO / "deploy" / "kubernetes"
COMPONENTS = K8S / "components"
KUBERNETES_VERSION = "1.30"  # the oldest release still in wide use that has every field the manifests set
SERVICEMONITOR_SCHEMA = Path(__file__).parent / "schemas" / "servicemonitor.monitoring.coreos.com.v1.json"
ROUTER_VALUES = COMPONENTS / "inference-gateway" / "router-values.yaml"

VARIANTS = {
    "fleet": (),
    "s3": (COMPONENTS / "s3",),
    "inference-gateway": (COMPONENTS / "inference-gateway",),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def objects(request: pytest.FixtureRequest) -> list[Obj]:
    return build(K8S, VARIANTS[request.param])


def container(objects: list[Obj]) -> Obj:
    (only,) = pod_spec(one(objects, "Deployment"))["containers"]
    return only


def app_paths() -> set[str]:
    return {getattr(route, "path", None) for route in create_app(Settings()).routes}


def strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with field validation on (kubectl's default):
    fields it does not list are errors, except where it keeps unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def test_the_builder_covers_every_kustomization_feature_used() -> None:
    assert not used_features(K8S)
    on_disk = {path for path in COMPONENTS.iterdir() if path.is_dir()}
    default = {K8S / c for c in yaml.safe_load((K8S / "kustomization.yaml").read_text())["components"]}
    assert on_disk == default | {c for extra in VARIANTS.values() for c in extra}  # every component is tested


def test_every_object_is_valid(objects: list[Obj]) -> None:
    crd = Draft202012Validator(strict(json.loads(SERVICEMONITOR_SCHEMA.read_text())["openAPIV3Schema"]))
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd.iter_errors(obj)]
            assert not errors, errors
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kinds_of_each_variant() -> None:
    kinds = {name: sorted(obj["kind"] for obj in build(K8S, extra)) for name, extra in VARIANTS.items()}
    assert (
        kinds["fleet"]
        == kinds["inference-gateway"]
        == ["Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"]
    )
    assert kinds["s3"] == ["Deployment", "Service", "ServiceMonitor"]


def test_port_is_the_default_port_and_the_services(objects: list[Obj], dockerfile: list[Instruction]) -> None:
    (port,) = container(objects)["ports"]
    assert port["containerPort"] == Settings.model_fields["port"].default
    (exposed,) = [ins.args for ins in final_stage(dockerfile) if ins.keyword == "EXPOSE"]
    assert int(exposed) == port["containerPort"]
    service = one(objects, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_probes_are_the_apps_readiness_and_liveness_routes(objects: list[Obj]) -> None:
    spec = container(objects)
    ready, live = spec["readinessProbe"]["httpGet"], spec["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/ready", "/health")  # /health fails once the engine stopped
    assert {ready["path"], live["path"]} <= app_paths()
    assert ready["port"] == live["port"] == spec["ports"][0]["name"]
    # liveness must pass while the model loads (no lifespan here: nothing is loaded)
    assert TestClient(create_app(Settings())).get(live["path"]).status_code == 200


def test_runs_as_the_images_user(objects: list[Obj], dockerfile: list[Instruction]) -> None:
    (user,) = [ins.args for ins in final_stage(dockerfile) if ins.keyword == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    security = pod_spec(one(objects, "Deployment"))["securityContext"]
    assert security["runAsNonRoot"] and (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert security["fsGroup"] == gid  # mounted volumes writable by the image's user
    own = container(objects)["securityContext"]
    assert own["readOnlyRootFilesystem"] and not own["allowPrivilegeEscalation"]


def test_volumes_are_the_images_data_dirs(objects: list[Obj], dockerfile: list[Instruction]) -> None:
    env = env_assignments(final_stage(dockerfile))
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment"))["volumes"]}
    assert set(mounts.values()) == set(volumes)
    adapters = volumes[mounts[env["LORAPLEX_ADAPTER_DIR"]]]
    assert env["LORAPLEX_CACHE_DIR"] in mounts and Path(env["HF_HOME"]).is_relative_to(env["LORAPLEX_CACHE_DIR"])
    claims = [obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"]
    if "persistentVolumeClaim" in adapters:  # every replica on one store: the claim must allow it
        (claim,) = claims
        assert adapters["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert not claims and "emptyDir" in adapters


def service_links(services: list[Obj]) -> dict[str, str]:
    """The variables Kubernetes gives a pod for each Service of its namespace, unless enableServiceLinks is false
    (Docker's link variables): a Service named loraplex gives LORAPLEX_PORT=tcp://IP:PORT, LORAPLEX_SERVICE_HOST..."""
    links = {}
    for service in services:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        links[f"{prefix}_SERVICE_HOST"] = "10.0.0.1"
        links[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        links[f"{prefix}_PORT"] = f"tcp://10.0.0.1:{ports[0]['port']}"
        for port in ports:
            if "name" in port:
                links[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            tcp = f"{prefix}_PORT_{port['port']}_TCP"
            links |= {tcp: f"tcp://10.0.0.1:{port['port']}", f"{tcp}_PROTO": "tcp", f"{tcp}_PORT": str(port["port"])}
            links[f"{tcp}_ADDR"] = "10.0.0.1"
    return links


def test_settings_come_from_existing_variables(objects: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable the pod's server reads is a setting with a valid value, the ones Kubernetes adds included:
    with service links on (its default), the Service named loraplex set LORAPLEX_PORT to tcp://IP:8000, which no
    port reads, and the server never started."""
    fields = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}
    env = container(objects)["env"]
    names = {e["name"] for e in env if e["name"].startswith("LORAPLEX_")}
    assert names <= fields, names - fields
    for item in env:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    if pod_spec(one(objects, "Deployment")).get("enableServiceLinks", True):
        services = [obj for obj in objects if obj["kind"] == "Service"]
        for name, value in service_links(services).items():
            monkeypatch.setenv(name, value)
    Settings()  # every literal value is valid


def test_one_gpu_per_pod(objects: list[Obj]) -> None:
    resources = container(objects)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]


def test_the_scrape_sends_the_inference_key(objects: list[Obj]) -> None:
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["path"] in app_paths()
    assert endpoint["port"] in {p["name"] for p in one(objects, "Service")["spec"]["ports"]}
    (api_key,) = [e for e in container(objects)["env"] if e["name"] == "LORAPLEX_API_KEY"]
    secret = api_key["valueFrom"]["secretKeyRef"]
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer" and credentials == {
        "name": secret["name"],
        "key": secret["key"],
    }


def test_s3_variant_passes_the_store_and_aws_credentials() -> None:
    spec = container(build(K8S, VARIANTS["s3"]))
    args = spec["args"]
    assert args[0] == "--adapter-store" and args[1].startswith("s3://")
    assert [source["secretRef"]["name"] for source in spec["envFrom"]] == ["loraplex-s3"]
    serve = next(
        action
        for action in build_parser()._subparsers._group_actions[0].choices.values()
        if action.prog.endswith(" serve")
    )
    if "--adapter-store" not in serve._option_string_actions:
        pytest.skip("--adapter-store is not in this loraplex yet (the shared adapter store)")
    build_parser().parse_args(["serve", *args])


def test_gateway_pods_carry_the_engine_the_picker_is_configured_for() -> None:
    objects = build(K8S, VARIANTS["inference-gateway"])
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    router = yaml.safe_load(ROUTER_VALUES.read_text())["router"]
    config = yaml.safe_load(router["epp"]["pluginsCustomConfig"][router["epp"]["pluginsConfigFile"]])
    plugins = {p["type"]: p.get("parameters", {}) for p in config["plugins"]}
    (engine,) = plugins["core-metrics-extractor"]["engineConfigs"]
    assert labels["llm-d.ai/engine-type"] == engine["name"] == plugins["core-metrics-extractor"]["defaultEngine"]
    assert router["modelServers"]["matchLabels"].items() <= labels.items()
    ports = [p["number"] for p in router["modelServers"]["targetPorts"]]
    assert ports == [container(objects)["ports"][0]["containerPort"]]
    assert plugins["metrics-data-source"]["path"] == "/metrics"
    referenced = {ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]}
    assert referenced == set(plugins) - {"metrics-data-source", "core-metrics-extractor"}


def test_docs_name_existing_files() -> None:
    for doc in ("docs/kubernetes.md", "README.md"):
        paths = set(re.findall(r"\bdeploy/[\w./-]*\w", (REPO / doc).read_text()))
        missing = {path for path in paths if not (REPO / path).exists() and path != "deploy/loraplex.env"}
        assert not missing, f"{doc} names {missing}"
