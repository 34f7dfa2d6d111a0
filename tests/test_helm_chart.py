"""The Helm chart helm/bayling, checked with the real `helm` binary (scripts/install-test-tools.sh
puts it at .tools/bin/helm) and the Kubernetes schemas of `kubernetes-validate`.

Every configuration users start from (the chart's ci/*-values.yaml: GPU, CPU staging, delta build,
CPU build from a volume, an existing engine, HPA and KEDA autoscaling) is linted, rendered, and
every rendered object is validated against the Kubernetes API schemas (strict: unknown fields are
errors) of the oldest and newest supported Kubernetes versions; InferencePool and HTTPRoute against
the openAPIV3Schema of their CRDs as released (tests/data/crd-*.json: Gateway API Inference
Extension v1.5.0, Gateway API v1.3.0), with fields the schema does not declare refused too (the API
server would drop them silently); ServiceMonitor, PodMonitor and ScaledObject against minimal
schemas of their required fields below. Then the assertions a reviewer of the chart would make by hand.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "bayling"
HELM = ROOT / ".tools" / "bin" / "helm"
CRD_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1", "inference.networking.k8s.io/v1", "gateway.networking.k8s.io/v1")
DATA = ROOT / "tests" / "data"
GAIE = json.loads((DATA / "gateway-api-inference-extension-v1.5.0.json").read_text())
K8S_VERSIONS = ("1.29.0", "1.37.0")   # Chart.yaml kubeVersion >=1.29; the newest schemas kubernetes-validate has
VARIANTS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
GPU = "nvidia.com/gpu"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: run scripts/install-test-tools.sh (make test does)", pytrace=False)
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def _template_args(values: tuple[str, ...], sets: tuple[str, ...], apis: bool) -> list[str]:
    args = ["template", "rel", str(CHART), "--namespace", "llm"]
    for v in values:
        args += ["-f", str(CHART / "ci" / v)]
    for s in sets:
        args += ["--set", s]
    if apis:
        for api in CRD_APIS:
            args += ["--api-versions", api]
    return args


@functools.lru_cache(maxsize=None)
def _render(values: tuple[str, ...], sets: tuple[str, ...], apis: bool) -> tuple[dict, ...]:
    out = helm(*_template_args(values, sets, apis)).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def render(*values: str, sets: tuple[str, ...] = (), apis: bool = True) -> list[dict]:
    return list(_render(tuple(values), tuple(sets), apis))


def render_error(*values: str, sets: tuple[str, ...] = (), apis: bool = False) -> str:
    result = helm(*_template_args(tuple(values), tuple(sets), apis), check=False)
    assert result.returncode != 0, "helm template should have refused these values"
    return result.stderr


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def triton(docs):
    return one(docs, "Deployment", "rel-bayling")


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] + pod_spec.get("initContainers", []) if c["name"] == name)


def env(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def arg(c: dict, flag: str) -> str:
    args = c["args"]
    assert flag in args, f"{c['name']} has no {flag}: {args}"
    return args[args.index(flag) + 1]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out


# --- minimal schemas for the CRD objects kubernetes-validate has no schema for ----------------------
_MONITOR_ENDPOINT = {"type": "object", "required": ["port"],
                     "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {"spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                                "properties": {"selector": {"type": "object", "required": ["matchLabels"]},
                                               "endpoints": {"type": "array", "minItems": 1, "items": _MONITOR_ENDPOINT}}}}},
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {"spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                                "properties": {"selector": {"type": "object", "required": ["matchLabels"]},
                                               "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _MONITOR_ENDPOINT}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {"spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                                "properties": {
                                    "scaleTargetRef": {"type": "object", "required": ["name"],
                                                       "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                                      "apiVersion": {"type": "string"}}},
                                    "minReplicaCount": {"type": "integer", "minimum": 0},
                                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                                    "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                                    "triggers": {"type": "array", "minItems": 1, "items": {
                                        "type": "object", "required": ["type", "metadata"],
                                        "properties": {"type": {"const": "prometheus"},
                                                       "metadata": {"type": "object", "required": ["serverAddress", "query", "threshold"],
                                                                    "additionalProperties": {"type": "string"}}}}}}}}},
}


# --- the released CRD schemas, recorded as data --------------------------------------------------------
RELEASED_CRDS = {}
for _path in sorted(DATA.glob("crd-*.json")):
    _crd = json.loads(_path.read_text())
    RELEASED_CRDS[(f"{_crd['group']}/{_crd['version']}", _crd["kind"])] = _crd


def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare (an API server prunes them silently)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
            return []
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        out = []
        for key, sub in value.items():
            if props is not None and key in props:
                out += undeclared_fields(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += undeclared_fields(sub, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                out.append(f"{path}.{key}")
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value) for f in undeclared_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def validate_released_crd(doc: dict) -> None:
    crd = RELEASED_CRDS[(doc["apiVersion"], doc["kind"])]
    assert crd["served"], f"{doc['apiVersion']} {doc['kind']} is not served by {crd['source']['tag']}"
    jsonschema.validate(doc, crd["openAPIV3Schema"])
    extra = undeclared_fields(doc, crd["openAPIV3Schema"])
    assert not extra, f"{doc['kind']}/{doc['metadata']['name']}: fields the CRD does not declare: {extra}"


# --- lint, render, validate ----------------------------------------------------------------------------
def test_the_variants_cover_gpu_cpu_build_existing_and_autoscaling():
    assert {"gpu-values.yaml", "cpu-values.yaml", "build-delta-values.yaml", "cpu-build-values.yaml",
            "existing-engine-values.yaml", "autoscaling-hpa-values.yaml", "autoscaling-keda-values.yaml",
            "inference-pool-values.yaml", "inference-pool-cpu-values.yaml"} <= set(VARIANTS)


@pytest.mark.parametrize("values", [None, *VARIANTS])
def test_helm_lint_is_clean(values):
    args = ["lint", str(CHART), "--strict"] + (["-f", str(CHART / "ci" / values)] if values else [])
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout


@pytest.mark.parametrize("values", [None, *VARIANTS])
def test_every_rendered_object_validates_against_the_kubernetes_schemas(values):
    docs = render(values) if values else render()
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in RELEASED_CRDS:
            validate_released_crd(doc)
            continue
        if key in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
            continue
        for version in K8S_VERSIONS:
            # raises ValidationError / SchemaNotFoundError (an unknown kind is an error too)
            kubernetes_validate.validate(doc, version, strict=True)


def test_values_schema_describes_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value, node, path):
        if isinstance(value, dict):
            for key, sub in value.items():
                props = node.get("properties", {})
                if key in props:
                    walk(sub, props[key], f"{path}.{key}")
                elif isinstance(node.get("additionalProperties"), dict):
                    walk(sub, node["additionalProperties"], f"{path}.{key}")
                else:
                    # only free-form Kubernetes objects (affinity, strategy...) stop here
                    assert node.get("type") == "object" and "properties" not in node, f"{path}.{key} is not in values.schema.json"
        elif isinstance(value, list):
            assert node.get("type") == "array", f"{path} is not an array in the schema"
            for i, item in enumerate(value):
                walk(item, node.get("items", {}), f"{path}[{i}]")
        else:
            assert node, f"{path} has no schema"
            assert "type" in node or "const" in node or "enum" in node, f"{path}: the schema gives no type"

    walk(values, schema, "values")
    assert schema.get("additionalProperties") is False


def test_values_files_pass_yamllint():
    yamllint = Path(sys.executable).parent / "yamllint"
    config = "{extends: default, rules: {line-length: {max: 140}, truthy: {check-keys: false}, document-start: disable}}"
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]
    result = subprocess.run([str(yamllint), "-f", "parsable", "-d", config, *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("bad,message", [
    ("mode=tpu", "mode"),
    ("triton.prots.http=1", "prots"),
    ("triton.probes.startupBudgetSeconds.gpu=300", "startupBudgetSeconds"),
    ("securityContext.allowPrivilegeEscalation=true", "allowPrivilegeEscalation"),
    ("podSecurityContext.runAsNonRoot=false", "runAsNonRoot"),
    ("engine.build.quant=int4", "quant"),
])
def test_the_schema_refuses_bad_values(bad, message):
    assert message in render_error(sets=(bad,))


@pytest.mark.parametrize("sets,message", [
    (("mode=gpu", "engine.source=builtin"), "needs mode=cpu"),
    (("engine.source=existing",), "engine.existing.claimName"),
    (("weights.source=volume",), "weights.volume.claimName"),
    (("model.release=BayLing-13B-v1.0", "weights.source=volume", "weights.volume.claimName=w",
      "weights.volume.modelPath=delta"), "weights.volume.basePath"),
    (("model.release=BayLing-99B",), "BayLing-13B-v1.1"),      # the message lists the known releases
    (("autoscaling.hpa.enabled=true", "autoscaling.keda.enabled=true"), "not both"),
    (("ingress.enabled=true",), "openaiGateway.enabled=true"),
])
def test_impossible_combinations_fail_with_a_clear_message(sets, message):
    assert message in render_error(sets=sets, apis=True)


@pytest.mark.parametrize("sets,api", [
    (("metrics.serviceMonitor.enabled=true",), "monitoring.coreos.com/v1"),
    (("metrics.podMonitor.enabled=true",), "monitoring.coreos.com/v1"),
    (("mode=cpu", "engine.source=builtin", "autoscaling.keda.enabled=true"), "keda.sh/v1alpha1"),
])
def test_crd_objects_need_their_api_in_the_cluster(sets, api):
    assert api in render_error(sets=sets, apis=False)


# --- images ---------------------------------------------------------------------------------------------
def test_the_default_gpu_image_is_the_pinned_ngc_release():
    from bayling.build_engine.trtllm_release import TRITON_IMAGE

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["gpu"]["tag"] == TRITON_IMAGE.split(":", 1)[1]
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert f"ARG BASE_IMAGE={TRITON_IMAGE}\n" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    c = container(triton(render())["spec"]["template"]["spec"], "triton")
    assert c["image"].endswith(":" + TRITON_IMAGE.split(":", 1)[1])


def test_the_cpu_image_bakes_the_engine_the_chart_serves_in_builtin_mode():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert f"bayling build --default --output {values['engine']['builtin']['path']}" in dockerfile
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", dockerfile, re.M), "pin the base by tag"
    assert "USER 1000:1000" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    c = container(triton(render("cpu-values.yaml"))["spec"]["template"]["spec"], "triton")
    assert arg(c, "--engine") == values["engine"]["builtin"]["path"]
    assert c["image"] == f"{values['image']['cpu']['repository']}:{values['image']['cpu']['tag']}"


# --- GPU only in GPU mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("values", ["gpu-values.yaml", "build-delta-values.yaml", "existing-engine-values.yaml",
                                    "autoscaling-hpa-values.yaml", "inference-pool-values.yaml"])
def test_gpu_mode_requests_one_gpu_on_gpu_nodes(values):
    docs = render(values)
    for name, spec in pod_specs(docs):
        for c in spec["containers"]:
            if c["name"] in ("triton", "build"):
                assert c["resources"]["limits"][GPU] == 1 and c["resources"]["requests"][GPU] == 1, name
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            else:  # the gateway, the demo and the init container need no GPU
                assert GPU not in json.dumps(c), f"{name}/{c['name']}"
        for c in spec.get("initContainers", []):
            assert GPU not in json.dumps(c["resources"])


@pytest.mark.parametrize("values", ["cpu-values.yaml", "cpu-build-values.yaml", "autoscaling-keda-values.yaml",
                                    "inference-pool-cpu-values.yaml"])
def test_cpu_mode_never_asks_for_a_gpu(values):
    docs = render(values)
    rendered = json.dumps(docs)
    assert GPU not in rendered and "nvidia.com/gpu.present" not in rendered
    for name, spec in pod_specs(docs):
        assert "runtimeClassName" not in spec and "tolerations" not in spec, name


# --- probes, ports, writable folders ----------------------------------------------------------------------
@pytest.mark.parametrize("values,budget", [("gpu-values.yaml", 1800), ("cpu-values.yaml", 600)])
def test_probes_give_a_large_engine_time_to_load_then_watch_health(values, budget):
    c = container(triton(render(values))["spec"]["template"]["spec"], "triton")
    startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    total = startup["failureThreshold"] * startup["periodSeconds"]
    assert total >= 600 and budget <= total < budget + startup["periodSeconds"]
    # bayling serve gives up on loading exactly when the probe does
    assert int(arg(c, "--ready-timeout")) == budget
    assert "initialDelaySeconds" not in live  # the startup probe, not a guessed delay, protects loading


@pytest.mark.parametrize("sets", [(), ("triton.ports.http=9000", "triton.ports.grpc=9001", "triton.ports.metrics=9002")])
def test_ports_match_the_flags_of_bayling_serve(sets):
    docs = render("gpu-values.yaml", sets=sets)
    c = container(triton(docs)["spec"]["template"]["spec"], "triton")
    assert c["command"] == ["bayling", "serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"http", "grpc", "metrics"}
    for name in ports:
        assert int(arg(c, f"--{name}-port")) == ports[name]
    assert arg(c, "--address") == "0.0.0.0"
    service = one(docs, "Service", "rel-bayling")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in ports.items()}
    assert service["spec"]["selector"] == triton(docs)["spec"]["selector"]["matchLabels"]
    for client in ("rel-bayling-openai", "rel-bayling-demo"):
        cc = one(docs, "Deployment", client)["spec"]["template"]["spec"]["containers"][0]
        assert arg(cc, "--url") == f"dns:///rel-bayling-headless:{ports['grpc']}"
    headless = one(docs, "Service", "rel-bayling-headless")
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"http": ports["http"], "grpc": ports["grpc"]}


def _parse_with_the_real_cli(module_name: str, argv: list[str]):
    """Parse argv with the argparse parser of a real `bayling` subcommand (an unknown flag exits)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog=module_name, exit_on_error=False)
    importlib.import_module(module_name).add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{module_name} does not accept {argv}") from None


@pytest.mark.parametrize("values", ["gpu-values.yaml", "cpu-values.yaml", "existing-engine-values.yaml"])
def test_bayling_serve_accepts_the_rendered_arguments(values):
    c = container(triton(render(values))["spec"]["template"]["spec"], "triton")
    args = _parse_with_the_real_cli("bayling.model_repository.serve", c["args"])
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert str(args.run_dir) == "/run/bayling"


@pytest.mark.parametrize("values", ["gpu-values.yaml", "build-delta-values.yaml", "cpu-build-values.yaml"])
def test_bayling_build_accepts_the_rendered_arguments(values):
    c = one(render(values), "Job")["spec"]["template"]["spec"]["containers"][0]
    e = env(c)
    # build-engine.sh adds --model/--output/--name (and --force for an unfinished folder)
    argv = ["--model", "/data/m", "--output", e["ENGINE_DIR"], "--name", e["MODEL_NAME"], "--force", *c["args"]]
    args = _parse_with_the_real_cli("bayling.build_engine.build", argv)
    assert args.target == ("trtllm" if "gpu" in values or "delta" in values else "cpu")


def test_writable_folders_are_emptydirs_and_the_root_filesystem_is_read_only():
    spec = triton(render("gpu-values.yaml"))["spec"]["template"]["spec"]
    c = container(spec, "triton")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    e = env(c)
    for path in ("/tmp", "/dev/shm", e["BAYLING_CACHE"], e["HOME"], arg(c, "--run-dir")):
        assert path in mounts, f"{path} is not writable"
        assert "emptyDir" in volumes[mounts[path]["name"]] and not mounts[path].get("readOnly")
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert all(v["emptyDir"].get("sizeLimit") for v in volumes.values() if "emptyDir" in v)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert e["HF_HUB_OFFLINE"] == "1"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


# --- security ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", VARIANTS)
def test_every_pod_runs_non_root_without_privileges(values):
    docs = render(values)
    specs = pod_specs(docs)
    assert specs
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # only the endpoint picker talks to the Kubernetes API (it watches its pool's pods)
        assert spec["automountServiceAccountToken"] is (name == "Deployment/rel-bayling-epp"), name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{name}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert not sc.get("privileged")
            assert c["resources"].get("limits", {}).get("memory"), f"{name}/{c['name']} has no memory limit"
        for v in spec.get("volumes", []):
            assert "hostPath" not in v, name
    assert not find(docs, "Secret"), "the chart must not create Secrets"


def test_the_hugging_face_token_comes_only_from_an_existing_secret():
    build = one(render("build-delta-values.yaml"), "Job")["spec"]["template"]["spec"]["containers"][0]
    assert env(build)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    # no secret name: no token at all (BayLing's repositories are public)
    build = one(render(), "Job")["spec"]["template"]["spec"]["containers"][0]
    assert "HF_TOKEN" not in env(build)
    # no token in the defaults or the examples
    for f in [CHART / "values.yaml", *(CHART / "ci").glob("*.yaml")]:
        assert not re.search(r"hf_[A-Za-z0-9]{20,}", f.read_text()), f
    schema = json.loads((CHART / "values.schema.json").read_text())
    token_secret = schema["properties"]["weights"]["properties"]["huggingface"]["properties"]["tokenSecret"]
    assert set(token_secret["properties"]) == {"name", "key"}   # a reference, nowhere to put a value


def test_network_policies_limit_who_reaches_triton():
    docs = render("gpu-values.yaml")
    policy = one(docs, "NetworkPolicy", "rel-bayling-triton")
    assert policy["spec"]["podSelector"]["matchLabels"] == triton(docs)["spec"]["selector"]["matchLabels"]
    rules = policy["spec"]["ingress"]
    serving = next(r for r in rules if {p["port"] for p in r["ports"]} == {"http", "grpc"})
    client_selector = serving["from"][0]["podSelector"]["matchLabels"]
    for name in ("rel-bayling-openai", "rel-bayling-demo"):
        labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert client_selector.items() <= labels.items(), f"{name} could not reach Triton"
    metrics = next(r for r in rules if [p["port"] for p in r["ports"]] == ["metrics"])
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]} == {53}
    build = one(docs, "NetworkPolicy", "rel-bayling-build")
    assert build["spec"]["ingress"] == [] and {p["port"] for p in build["spec"]["egress"][0]["ports"]} == {53, 443}


def test_pod_disruption_budget_covers_the_triton_pods():
    docs = render()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == triton(docs)["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1  # one replica can still be drained


# --- engine: build Job, ready marker, existing engine -------------------------------------------------------
def test_serving_pods_wait_for_the_ready_marker_the_build_job_writes():
    docs = render("gpu-values.yaml")
    job = one(docs, "Job")
    build = job["spec"]["template"]["spec"]["containers"][0]
    spec = triton(docs)["spec"]["template"]["spec"]
    wait = container(spec, "wait-for-engine")
    serve = container(spec, "triton")
    be, we = env(build), env(wait)
    assert be["READY_FILE"] == we["MARKER"] == be["ENGINE_DIR"] + ".ready"
    assert be["SPEC_HASH"] == we["EXPECT_HASH"] and be["SPEC_HASH"] in be["ENGINE_DIR"]
    assert we["BUILD_JOB"] == job["metadata"]["name"]
    assert arg(serve, "--engine") == be["ENGINE_DIR"]
    assert wait["command"] == ["sh", "/scripts/wait-for-engine.sh"]
    # the same claim: read-write for the Job, read-only for serving
    job_claim = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "engines")
    serve_claim = next(v for v in spec["volumes"] if v["name"] == "engines")
    assert job_claim["persistentVolumeClaim"]["claimName"] == serve_claim["persistentVolumeClaim"]["claimName"]
    assert serve_claim["persistentVolumeClaim"]["readOnly"] is True
    for c in (wait, serve):
        assert next(m for m in c["volumeMounts"] if m["name"] == "engines")["readOnly"] is True
    assert not next(m for m in build["volumeMounts"] if m["name"] == "engines").get("readOnly")
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == job_claim["persistentVolumeClaim"]["claimName"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # a rollout waiting hours for the build is not "stuck"
    assert triton(docs)["spec"]["progressDeadlineSeconds"] > int(we["TIMEOUT_SECONDS"])


def test_the_scripts_configmap_ships_the_tested_scripts():
    cm = one(render(), "ConfigMap", "rel-bayling-scripts")
    for name in ("build-engine.sh", "wait-for-engine.sh"):
        assert cm["data"][name].rstrip("\n") == (CHART / "files" / name).read_text().rstrip("\n")


def test_build_job_builds_the_int8_tensorrt_llm_engine_of_a_full_weight_release():
    job = one(render(), "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    e = env(c)
    assert c["command"] == ["bash", "/scripts/build-engine.sh"]
    assert c["args"] == ["--target", "trtllm", "--quant", "int8-wo", "--kv-cache", "fp16"]
    assert e["MODEL_REPO"] == "ICTNLP/bayling-13b-v1.1" and e["DELTA"] == "false" and "BASE_REPO" not in e
    assert e["MODEL_NAME"] == "BayLing-13B-v1.1" and e["WEIGHTS_SOURCE"] == "huggingface"
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert json.loads(e["SPEC_JSON"])["release"] == "BayLing-13B-v1.1"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_a_delta_release_downloads_its_base_and_builds_with_the_chosen_quantization():
    c = one(render("build-delta-values.yaml"), "Job")["spec"]["template"]["spec"]["containers"][0]
    e = env(c)
    assert e["DELTA"] == "true" and e["MODEL_REPO"] == "ICTNLP/bayling-13b-diff"
    assert e["BASE_REPO"] == "huggyllama/llama-13b"
    assert c["args"] == ["--target", "trtllm", "--quant", "int8-sq", "--kv-cache", "int8",
                         "--gpu-memory", "40GiB", "--max-context", "2048"]
    assert "-int8-sq-kv8-" in e["ENGINE_DIR"]


def test_a_cpu_build_from_a_weights_volume_merges_without_downloading():
    docs = render("cpu-build-values.yaml")
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    e = env(c)
    assert c["args"] == ["--target", "cpu", "--quantization", "q8_0"]
    assert e["WEIGHTS_SOURCE"] == "volume" and e["DELTA"] == "true"
    assert (e["MODEL_DIR"], e["BASE_DIR"]) == ("/weights/bayling-7b-diff", "/weights/llama-7b-hf")
    assert "MODEL_REPO" not in e and "HF_TOKEN" not in e
    weights = next(v for v in spec["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"] == {"claimName": "model-weights", "readOnly": True}
    assert next(m for m in c["volumeMounts"] if m["name"] == "weights")["readOnly"] is True
    assert not find(docs, "PersistentVolumeClaim")  # engine.persistence.existingClaim is used
    assert next(v for v in spec["volumes"] if v["name"] == "engines")["persistentVolumeClaim"]["claimName"] == "bayling-engines"


def test_the_build_spec_hash_follows_what_shapes_the_engine_and_nothing_else():
    def job_and_dir(*sets):
        docs = render(sets=sets)
        return one(docs, "Job")["metadata"]["name"], arg(container(triton(docs)["spec"]["template"]["spec"], "triton"), "--engine")

    base = job_and_dir()
    assert job_and_dir("triton.replicas=3", "openaiGateway.enabled=true") == base
    for change in ("engine.build.quant=fp16", "engine.build.kvCache=int8", "model.revision=v2",
                   "engine.build.gpuMemory=24GiB", "image.gpu.tag=other", "model.release=BayLing-2-7B"):
        job, folder = job_and_dir(change)
        assert job != base[0] and folder != base[1], change
        assert len(job) <= 63


def test_an_existing_engine_is_waited_for_by_its_manifest_and_no_job_runs():
    docs = render("existing-engine-values.yaml")
    assert not find(docs, "Job") and not find(docs, "PersistentVolumeClaim")
    spec = triton(docs)["spec"]["template"]["spec"]
    wait, serve = container(spec, "wait-for-engine"), container(spec, "triton")
    assert arg(serve, "--engine") == "/data/engines/bayling-13b-v1.1-int8-wo"
    assert env(wait)["MARKER"] == "/data/engines/bayling-13b-v1.1-int8-wo/manifest.json"
    assert "EXPECT_HASH" not in env(wait)
    claim = next(v for v in spec["volumes"] if v["name"] == "engines")["persistentVolumeClaim"]
    assert claim == {"claimName": "prebuilt-engines", "readOnly": True}


def test_the_builtin_cpu_engine_needs_no_volume_and_no_wait():
    docs = render("cpu-values.yaml")
    spec = triton(docs)["spec"]["template"]["spec"]
    assert "initContainers" not in spec and not find(docs, "Job") and not find(docs, "PersistentVolumeClaim")
    assert all("persistentVolumeClaim" not in v for v in spec["volumes"])


# --- clients and ingress -------------------------------------------------------------------------------------
def test_gateway_demo_and_ingress_are_wired_to_existing_services():
    docs = render("gpu-values.yaml")
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    gateway = one(docs, "Deployment", "rel-bayling-openai")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["command"] == ["bayling", "openai"] and arg(gateway, "--port") == "9000"
    demo = one(docs, "Deployment", "rel-bayling-demo")["spec"]["template"]["spec"]["containers"][0]
    assert demo["command"] == ["bayling", "demo-ui"] and arg(demo, "--port") == "8501"
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["tls"][0]["secretName"] == "bayling-tls"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            svc = path["backend"]["service"]
            ports = {p["port"] for p in services[svc["name"]]["spec"]["ports"]}
            assert svc["port"]["number"] in ports
    assert not find(render(), "Deployment", "rel-bayling-openai")  # optional, off by default


# --- autoscaling and monitoring ---------------------------------------------------------------------------------
def test_hpa_scales_triton_on_a_metric_the_adapter_rules_define():
    docs = render("autoscaling-hpa-values.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-bayling"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "bayling_waiting_requests"
    assert "replicas" not in triton(docs)["spec"], "the HPA owns the replica count"
    rules = yaml.safe_load(one(docs, "ConfigMap", "rel-bayling-prometheus-adapter-rules")["data"]["values.yaml"])
    by_name = {r["name"]["as"]: r for r in rules["rules"]["custom"]}
    assert set(by_name) == {"bayling_waiting_requests", "bayling_kv_cache_utilization", "triton_queue_compute_ratio"}
    waiting = by_name["bayling_waiting_requests"]
    # the queue the endpoint picker balances on (its builtin triton-tensorrt-llm specs)
    assert 'nv_trt_llm_request_metrics{request_type="waiting",' in waiting["metricsQuery"]
    assert 'kv_cache_block_type="fraction"' in by_name["bayling_kv_cache_utilization"]["metricsQuery"]
    ratio = by_name["triton_queue_compute_ratio"]["metricsQuery"]
    assert "nv_inference_queue_duration_us" in ratio and "nv_inference_compute_infer_duration_us" in ratio
    for rule in by_name.values():
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service", "rel-bayling")["metadata"]["labels"].items()


def test_cpu_adapter_rules_use_the_cpu_engines_queue_and_tritons_pending_requests():
    from bayling.model_repository.engine_ct2 import LOAD_METRICS

    rules = yaml.safe_load(one(render(sets=("mode=cpu", "engine.source=builtin", "autoscaling.hpa.enabled=true")),
                               "ConfigMap", "rel-bayling-prometheus-adapter-rules")["data"]["values.yaml"])
    by_name = {r["name"]["as"]: r for r in rules["rules"]["custom"]}
    waiting = by_name["bayling_waiting_requests"]
    assert f'{LOAD_METRICS["waiting"][0]}{{<<.LabelMatchers>>}}' in waiting["metricsQuery"]
    assert 'nv_inference_pending_request_count{model="bayling",' in waiting["metricsQuery"]
    assert waiting["seriesQuery"].startswith(LOAD_METRICS["waiting"][0] + "{")
    kv = by_name["bayling_kv_cache_utilization"]
    assert kv["seriesQuery"].startswith(LOAD_METRICS["kv_cache_utilization"][0] + "{")
    assert "nv_trt_llm" not in json.dumps(rules)


def test_keda_scales_triton_from_a_prometheus_query_of_this_release():
    docs = render("autoscaling-keda-values.yaml")
    so = one(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "rel-bayling"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 3)
    query = so["spec"]["triggers"][0]["metadata"]["query"]
    assert 'namespace="llm"' in query and 'pod=~"rel-bayling-' in query
    assert re.fullmatch(r"rel-bayling-[a-z0-9]+-[a-z0-9]+", "rel-bayling-7d9f8c6b5-x2x9z")
    assert not find(docs, "HorizontalPodAutoscaler") and "replicas" not in triton(docs)["spec"]
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# Metric names the dashboard may use, and where each was checked:
#  - Triton core (docs/user_guide/metrics.md; the 2.51 library of nvidia-pytriton holds these names)
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                  "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_request_duration_us", "nv_inference_pending_request_count",
                  "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                  # opt-in histogram (--metrics-config histogram_latencies=true), newer than 2.51
                  "nv_inference_first_response_histogram_ms"}
#  - NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/custom_metrics_reporter/custom_metrics_reporter.cc
#    (read at commit 0d5352f5; tensorrtllm_backend v0.17.0 had neither "waiting" nor "fraction", which
#    the endpoint picker's triton-tensorrt-llm specs read)
TRTLLM_METRICS = {"nv_trt_llm_request_metrics": ("request_type", {"active", "max", "scheduled", "context", "waiting"}),
                  "nv_trt_llm_kv_cache_block_metrics": ("kv_cache_block_type",
                                                        {"max", "free", "used", "tokens_per", "reused", "fraction"}),
                  "nv_llm_output_token_len": ("response_metric_type", {"total_output_tokens"})}


def _bayling_metrics() -> set[str]:
    """Names the Triton models of this project register (pb_utils.MetricFamily(name=...))."""
    names = set()
    for model in (ROOT / "model_repository" / "templates").glob("*/1/model.py"):
        names |= set(re.findall(r'MetricFamily\(\s*name="([a-z_]+)"', model.read_text()))
    return names


def test_grafana_dashboard_shows_ttft_itl_queue_requests_and_kv_cache_with_real_metric_names():
    cm = one(render(), "ConfigMap", "rel-bayling-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["bayling-triton.json"])
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("time to first token", "inter-token", "queue", "requests per second", "kv cache"):
        assert topic in titles, topic
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:nv|bayling)_[a-z0-9_]+)\s*\{", e)}
    ours = _bayling_metrics()
    assert {"bayling_requests_total", "bayling_engine_generated_tokens_total"} <= ours
    known = TRITON_METRICS | set(TRTLLM_METRICS) | ours
    histograms = {"nv_inference_first_response_histogram_ms", "nv_llm_output_token_len"}
    unknown = {m for m in used if m not in known and re.sub(r"_(bucket|sum|count)$", "", m) not in histograms}
    assert not unknown, f"the dashboard uses metrics nothing exports: {unknown}"
    for e in exprs:
        for name, (label, values) in TRTLLM_METRICS.items():
            for m in re.finditer(rf"\b{name}\w*\{{([^}}]*)\}}", e):
                for value in re.findall(rf'{label}="([^"]+)"', m.group(1)):
                    assert value in values, f"{name}{{{label}={value!r}}} does not exist"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


# --- NOTES.txt -------------------------------------------------------------------------------------------------
def test_notes_tell_how_to_reach_the_service_and_chat():
    result = helm("install", "rel", str(CHART), "--namespace", "llm", "--dry-run=client",
                  "-f", str(CHART / "ci" / "gpu-values.yaml"))
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n llm logs -f job/rel-bayling-build-" in notes
    assert "kubectl -n llm port-forward svc/rel-bayling 8000:http 8001:grpc 8002:metrics" in notes
    assert "bayling chat --url localhost:8001" in notes
    assert "/v2/models/bayling/generate" in notes and "/v1/chat/completions" in notes
    assert "docker/Dockerfile.gpu" in notes  # the default image name is local: say how to get one


def test_gpu_mode_turns_on_first_response_histograms_and_cpu_threads_default_to_the_engine_size():
    gpu = container(triton(render("gpu-values.yaml"))["spec"]["template"]["spec"], "triton")["args"]
    cpu = container(triton(render("cpu-values.yaml"))["spec"]["template"]["spec"], "triton")["args"]
    assert "--triton-arg=--metrics-config=histogram_latencies=true" in gpu
    assert not any(a.startswith("--triton-arg") for a in cpu)  # Triton 2.51 on CPU has no such histogram
    assert "--cpu-threads" not in cpu  # by engine size unless set
    pinned = container(triton(render("cpu-values.yaml", sets=("triton.cpuThreads=4",)))["spec"]["template"]["spec"], "triton")
    assert arg(pinned, "--cpu-threads") == "4"


@pytest.mark.parametrize("deployment, module", [("rel-bayling-openai", "bayling.client.openai_gateway"),
                                                 ("rel-bayling-demo", "bayling.client.demo_ui")])
def test_the_gateway_and_the_demo_accept_the_rendered_arguments(deployment, module):
    c = one(render("gpu-values.yaml"), "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    args = _parse_with_the_real_cli(module, c["args"])
    assert args.url == "dns:///rel-bayling-headless:8001"
    assert getattr(args, "host", None) == "0.0.0.0" or getattr(args, "address", None) == "0.0.0.0"
    assert args.port == c["ports"][0]["containerPort"]


def test_text_model_instances_follow_the_cores_unless_set_and_the_server_accepts_them():
    default = container(triton(render("gpu-values.yaml"))["spec"]["template"]["spec"], "triton")["args"]
    assert "--entry-instances" not in default and "--text-instances" not in default   # from the pod's CPU limit
    sets = ("triton.entryInstances=4", "triton.textInstances=2")
    c = container(triton(render("gpu-values.yaml", sets=sets))["spec"]["template"]["spec"], "triton")
    args = _parse_with_the_real_cli("bayling.model_repository.serve", c["args"])
    assert (args.entry_instances, args.text_instances) == (4, 2)
    failed = helm("template", "rel", str(CHART), "-f", str(CHART / "ci" / "gpu-values.yaml"),
                  "--set", "triton.entryInstances=0", check=False)
    assert failed.returncode != 0 and "entryInstances" in failed.stderr


# --- routing: the headless Service, the InferencePool and its endpoint picker ------------------------------------
POOL_VARIANTS = {"gpu": "inference-pool-values.yaml", "cpu": "inference-pool-cpu-values.yaml"}


def epp_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "rel-bayling-epp")["data"]["epp-config.yaml"])


@pytest.mark.parametrize("sets", [(), ("mode=cpu", "engine.source=builtin")])
def test_service_mode_clients_balance_over_the_headless_service_of_the_triton_pods(sets):
    from bayling.client.library import parse_targets

    docs = render("gpu-values.yaml", sets=sets)
    headless = one(docs, "Service", "rel-bayling-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["spec"]["selector"] == triton(docs)["spec"]["selector"]["matchLabels"]
    gateway = one(docs, "Deployment", "rel-bayling-openai")["spec"]["template"]["spec"]["containers"][0]
    args = _parse_with_the_real_cli("bayling.client.openai_gateway", gateway["args"])
    targets = parse_targets(args.url, args.protocol)
    assert (targets.dns_name, targets.dns_port) == ("rel-bayling-headless", 8001) and args.balance == "least_requests"
    assert not find(docs, "InferencePool") and not find(docs, "HTTPRoute") and not find(docs, "Deployment", "rel-bayling-epp")
    assert "inference.networking.k8s.io/engine-type" not in triton(docs)["spec"]["template"]["metadata"]["labels"]
    assert [c["name"] for c in triton(docs)["spec"]["template"]["spec"]["containers"]] == ["triton"]


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_inference_pool_mode_renders_the_pool_its_picker_and_a_route_that_fit_together(mode):
    docs = render(POOL_VARIANTS[mode])
    deployment = triton(docs)
    pod = deployment["spec"]["template"]
    sidecar = container(pod["spec"], "openai")
    pool = one(docs, "InferencePool", "rel-bayling")
    # the pool selects exactly the serving pods and targets their OpenAI sidecar
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pool["spec"]["targetPorts"] == [{"number": sidecar["ports"][0]["containerPort"]}]
    args = _parse_with_the_real_cli("bayling.client.openai_gateway", sidecar["args"])
    assert args.url == "localhost:8001" and args.host == "0.0.0.0" and args.port == 9000
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert GPU not in json.dumps(sidecar)
    # the picker: its Service is the pool's endpointPickerRef, on the ext-proc port it listens on
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = one(docs, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    assert ref["port"]["number"] == GAIE["ports"]["value"]["grpc"]
    epp = one(docs, "Deployment", ref["name"])
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == ("FailClose" if mode == "gpu" else "FailOpen")
    # the route: the user's Gateway, OpenAI paths to the pool
    route = one(docs, "HTTPRoute", "rel-bayling")
    parent = route["spec"]["parentRefs"][0]
    if mode == "gpu":
        assert (parent["name"], parent["namespace"], parent["sectionName"]) == ("inference-gateway", "gateways", "https")
        assert route["spec"]["hostnames"] == ["bayling.example.com"]
    rule = route["spec"]["rules"][0]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "rel-bayling"}]
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/v1"}
    assert rule["timeouts"]["request"] == "600s"


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_the_endpoint_picker_is_the_pinned_release_with_only_its_own_flags_plugins_and_permissions(mode):
    docs = render(POOL_VARIANTS[mode])
    epp = one(docs, "Deployment", "rel-bayling-epp")
    spec = epp["spec"]["template"]["spec"]
    c = container(spec, "epp")
    assert c["image"] == GAIE["image"]["value"]
    flags = {a.split("=", 1)[0][2:] for a in c["args"] if a.startswith("--")}
    assert flags <= set(GAIE["flags"]["value"]), flags - set(GAIE["flags"]["value"])
    assert (arg(c, "--pool-name"), arg(c, "--pool-namespace"), arg(c, "--pool-group")) == \
           ("rel-bayling", "llm", "inference.networking.k8s.io")
    # it scrapes Triton's metrics port (the pool targets the sidecar)
    assert int(arg(c, "--model-server-metrics-port")) == next(
        p["containerPort"] for p in container(triton(docs)["spec"]["template"]["spec"], "triton")["ports"]
        if p["name"] == "metrics")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == GAIE["ports"]["value"]
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": GAIE["ports"]["health_service"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert arg(c, "--config-file").startswith(mount["mountPath"] + "/")
    # config: the release's EndpointPickerConfig, plugins it registers, profiles naming them
    config = epp_config(docs)
    facts = GAIE["config"]
    assert (config["apiVersion"], config["kind"]) == (facts["apiVersion"], facts["kind"])
    assert set(config) <= set(facts["fields"]) | {"apiVersion", "kind"}
    types = [p["type"] for p in config["plugins"]]
    assert set(types) <= set(GAIE["plugin_types"]["value"])
    for profile in config["schedulingProfiles"]:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in types and set(ref) <= set(facts["profile_plugin_fields"])
    assert ("prefix-cache-scorer" in types) == (mode == "gpu")   # TensorRT-LLM reuses KV blocks; CTranslate2 does not
    # the permissions the release's own chart grants, no more (no cluster-wide role)
    role = one(docs, "Role", "rel-bayling-epp")
    assert role["rules"] == GAIE["rbac"]["value"]
    binding = one(docs, "RoleBinding", "rel-bayling-epp")
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"] == "rel-bayling-epp"
    assert not find(docs, "ClusterRole")
    assert GPU not in json.dumps(spec) and "nodeSelector" not in spec


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_the_picker_reads_the_metrics_the_serving_pods_export_under_the_names_it_is_configured_with(mode):
    from bayling.model_repository.engine_ct2 import LOAD_METRICS

    docs = render(POOL_VARIANTS[mode])
    extractor = next(p for p in epp_config(docs)["plugins"] if p["type"] == "core-metrics-extractor")
    params = extractor["parameters"]
    assert set(params) <= set(GAIE["metrics_extractor"]["parameters"])
    label = triton(docs)["spec"]["template"]["metadata"]["labels"][GAIE["metrics_extractor"]["engine_label_key"]]
    assert label == params["defaultEngine"]
    source = next(p for p in epp_config(docs)["plugins"] if p["type"] == "metrics-data-source")
    assert source["parameters"]["path"] == "/metrics"
    if mode == "gpu":
        # the release's builtin specs for Triton TensorRT-LLM, on labels the backend exports
        assert label == "triton-tensorrt-llm" and "engineConfigs" not in params
        specs = GAIE["metrics_extractor"]["builtin_engines"]["triton-tensorrt-llm"]
        for spec in specs.values():
            family, label, value = re.fullmatch(r"(\w+)\{(\w+)=(\w+)\}", spec).groups()
            assert TRTLLM_METRICS[family][0] == label and value in TRTLLM_METRICS[family][1], spec
        return
    engine = next(e for e in params["engineConfigs"] if e["name"] == label)
    assert set(engine) <= set(GAIE["metrics_extractor"]["engine_config_fields"])
    assert engine["queuedRequestsSpec"] == LOAD_METRICS["waiting"][0]
    assert engine["runningRequestsSpec"] == LOAD_METRICS["running"][0]
    assert engine["kvUsageSpec"] == LOAD_METRICS["kv_cache_utilization"][0]
    # the CPU model registers exactly these gauges, from that one table
    model = (ROOT / "model_repository" / "templates" / "tensorrt_llm_cpu" / "1" / "model.py").read_text()
    assert "LOAD_METRICS" in model and "MetricFamily.GAUGE" in model
    # and the autoscaler scales on the same queue
    rules = yaml.safe_load(one(render(POOL_VARIANTS[mode], sets=("autoscaling.hpa.enabled=true",)),
                               "ConfigMap", "rel-bayling-prometheus-adapter-rules")["data"]["values.yaml"])
    waiting = next(r for r in rules["rules"]["custom"] if r["name"]["as"] == "bayling_waiting_requests")
    assert engine["queuedRequestsSpec"] + "{" in waiting["metricsQuery"]


def test_inference_pool_mode_opens_the_sidecar_to_the_gateway_and_the_metrics_to_the_picker():
    docs = render(POOL_VARIANTS["cpu"])
    rules = one(docs, "NetworkPolicy", "rel-bayling-triton")["spec"]["ingress"]
    sidecar = next(r for r in rules if [p["port"] for p in r["ports"]] == ["openai"])
    assert "from" not in sidecar                                # routing.inferencePool.clientsFrom [] = anyone
    picker = [r for r in rules if [p["port"] for p in r["ports"]] == ["metrics"] and "podSelector" in r["from"][0]]
    epp_labels = one(docs, "Deployment", "rel-bayling-epp")["spec"]["template"]["metadata"]["labels"]
    assert picker and picker[0]["from"][0]["podSelector"]["matchLabels"].items() <= epp_labels.items()


def test_inference_pool_mode_needs_the_gateway_and_inference_apis_and_a_free_sidecar_port():
    needs = render_error(sets=("routing.mode=inference-pool",), apis=False)
    assert "inference.networking.k8s.io/v1" in needs and "--api-versions" in needs
    clash = render_error(sets=("routing.mode=inference-pool", "routing.inferencePool.sidecar.port=8002"), apis=True)
    assert "sidecar.port" in clash and "metrics" in clash
    assert "/routing/mode" in render_error(sets=("routing.mode=envoy",))


def test_released_crd_check_refuses_what_an_api_server_would_drop_or_refuse():
    pool = one(render(POOL_VARIANTS["cpu"]), "InferencePool")
    validate_released_crd(pool)
    typo = json.loads(json.dumps(pool))
    typo["spec"]["targetPort"] = typo["spec"].pop("targetPorts")
    with pytest.raises(Exception):
        validate_released_crd(typo)
    extra = json.loads(json.dumps(pool))
    extra["spec"]["endpointPickerRef"]["timeout"] = "5s"
    with pytest.raises(AssertionError, match="timeout"):
        validate_released_crd(extra)
    for crd in RELEASED_CRDS.values():
        assert re.fullmatch(r"v\d+\.\d+\.\d+", crd["source"]["tag"]) and len(crd["source"]["commit"]) == 40
