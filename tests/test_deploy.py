"""deploy/, checked offline: no Docker engine nor cluster here, so the files are parsed and cross-checked.

Kubernetes manifests go through kubernetes-validate (the API's JSON schemas, strict: an unknown field fails);
KEDA's ScaledObject is a CRD it does not know, so its structure is checked here. Then the files are held to
each other and to the code: one image, the settings' real names and values, probe paths that the app serves,
scripts that exist, the queue that KEDA watches.
"""

import dataclasses
import re
import shlex
import urllib.parse

import kubernetes_validate
import pytest
import yaml

import web
from settings import Settings
from support import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"
IMAGE = "image-classifier:latest"
SETTINGS_VARIABLES = {field.name.upper() for field in dataclasses.fields(Settings)}
OTHER_VARIABLES = {"TF_CPP_MIN_LOG_LEVEL", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PROMETHEUS_MULTIPROC_DIR"}


def manifests():
    documents = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def one(kind, name):
    [doc] = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def container(deployment):
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def configmap_settings():
    return Settings.from_env(one("ConfigMap", "image-classifier-settings")["data"])


def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile_instructions():
    """(instruction, argument) pairs of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def script_of(command):
    """The Python script a container command runs: ["python", "x.py"] -> "x.py"."""
    assert command[0] == "python", command
    return command[1]


# -- Kubernetes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, doc", [(f"{n}:{d['kind']}/{d['metadata']['name']}", d) for n, d in manifests()], ids=lambda v: v
)
def test_core_manifests_are_valid_kubernetes(name, doc):
    if doc["apiVersion"].startswith("keda.sh/"):
        pytest.skip("a KEDA CRD: checked by test_keda_scaled_object_scales_the_worker_on_the_queue_length")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_an_invalid_manifest_is_caught():
    """The validator is not a no-op: a misspelt field and a string where a number belongs both fail."""
    deployment = one("Deployment", "web")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def test_every_kind_the_service_needs_is_there():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests()}
    assert kinds == {
        ("ConfigMap", "image-classifier-settings"),
        ("Deployment", "web"),
        ("Service", "web"),
        ("Deployment", "worker"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("ScaledObject", "worker"),
    }


def test_keda_scaled_object_scales_the_worker_on_the_queue_length():
    scaled = one("ScaledObject", "worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    assert one("Deployment", target["name"]) is not None and target["name"] == "worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]  # 0 workers: web never ready, never woken
    # With at least one replica, KEDA's cooldownPeriod (the scale to zero) means nothing; the HPA's window does.
    assert "cooldownPeriod" not in spec
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert 0 < scale_down["stabilizationWindowSeconds"] <= 3600  # Kubernetes refuses more
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values())  # KEDA's metadata is map[string]string
    assert set(metadata) <= {"address", "host", "port", "databaseIndex", "listName", "listLength"}
    settings = configmap_settings()
    assert metadata["listName"] == settings.image_queue == Settings().image_queue
    assert int(metadata["listLength"]) >= 1
    redis_url = urllib.parse.urlsplit(settings.redis_url)
    assert metadata["address"] == f"{redis_url.hostname}:{redis_url.port}"
    assert metadata["databaseIndex"] == redis_url.path.strip("/")


def test_configmap_holds_only_real_settings_with_valid_values():
    data = one("ConfigMap", "image-classifier-settings")["data"]
    assert set(data) <= SETTINGS_VARIABLES, set(data) - SETTINGS_VARIABLES
    settings = configmap_settings()  # raises on a malformed value, naming the variable
    assert settings.host == "0.0.0.0"  # the default, loopback, would be unreachable from the Service


def test_every_worker_of_a_deployment_serves_the_same_model():
    # MODEL=auto decides per process (ResNet50 if its weights download then): scaled workers could mix models on
    # one queue, answering a V2 request for one model with the other's.
    assert configmap_settings().model == "efficientnet_lite0"
    assert Settings.from_env(compose()["x-app"]["environment"]).model == "efficientnet_lite0"


def test_web_and_worker_run_the_image_scripts_with_the_settings():
    web_deployment, worker_deployment = one("Deployment", "web"), one("Deployment", "worker")
    for deployment, script in ((web_deployment, "run_web_server.py"), (worker_deployment, "run_model_server.py")):
        c = container(deployment)
        assert c["image"] == IMAGE
        assert script_of(c["command"]) == script and (ROOT / script).is_file()
        assert c["envFrom"] == [{"configMapRef": {"name": "image-classifier-settings"}}]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_web_probes_hit_routes_the_app_serves_on_the_configured_port():
    settings = configmap_settings()
    routes = {rule.rule for rule in web.create_app(Settings()).url_map.iter_rules()}
    c = container(one("Deployment", "web"))
    [port] = c["ports"]
    assert port["containerPort"] == settings.port
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        assert c[probe]["httpGet"]["path"] == path and path in routes
        assert c[probe]["httpGet"]["port"] == port["name"]
    service = one("Service", "web")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == one("Deployment", "web")["spec"]["selector"]["matchLabels"]


def test_termination_grace_lets_requests_and_batches_finish():
    settings = configmap_settings()
    web_grace = one("Deployment", "web")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert web_grace >= int(settings.request_timeout) + 5  # run_web_server.py: gunicorn's graceful_timeout
    worker_grace = one("Deployment", "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert worker_grace >= 60


def test_redis_keeps_its_data_with_aof_on_a_volume_the_settings_point_at():
    redis = one("StatefulSet", "redis")
    c = container(redis)
    assert c["image"].split(":")[1].split(".")[0] == "7"
    assert " --appendonly yes" in " " + " ".join(c["args"])
    [mount] = c["volumeMounts"]
    assert mount["name"] in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert c["args"][c["args"].index("--dir") + 1] == mount["mountPath"]
    service = one("Service", "redis")
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    redis_url = urllib.parse.urlsplit(configmap_settings().redis_url)
    assert (redis_url.hostname, redis_url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])


# -- Compose ---------------------------------------------------------------------------------------------
def test_compose_runs_redis_with_aof_the_web_and_the_worker():
    services = compose()["services"]
    assert set(services) == {"redis", "web", "worker"}
    redis = services["redis"]
    assert redis["image"].split(":")[1].split(".")[0] == "7"
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":" + command[command.index("--dir") + 1]) for volume in redis["volumes"])
    for name, script in (("web", "run_web_server.py"), ("worker", "run_model_server.py")):
        service = services[name]
        assert service["image"] == IMAGE and service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert script_of(service["command"]) == script and (ROOT / script).is_file()
        environment = service["environment"]
        assert set(environment) <= SETTINGS_VARIABLES | OTHER_VARIABLES, set(environment) - SETTINGS_VARIABLES
        settings = Settings.from_env({k: str(v) for k, v in environment.items()})
        redis_url = urllib.parse.urlsplit(settings.redis_url)
        assert redis_url.hostname == "redis" and redis_url.port == 6379
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_grace_periods_match_the_cluster():
    services = compose()["services"]
    for name in ("web", "worker"):
        grace = services[name]["stop_grace_period"]
        assert grace.endswith("s")
        assert int(grace[:-1]) == one("Deployment", name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    web_env = Settings.from_env({k: str(v) for k, v in services["web"]["environment"].items()})
    assert web_env.host == "0.0.0.0"
    assert services["web"]["ports"] == [f"127.0.0.1:{web_env.port}:{web_env.port}"]


# -- Dockerfile ------------------------------------------------------------------------------------------
def test_dockerfile_installs_like_make_run_as_a_non_root_user_and_serves_the_web():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [argument for instruction, argument in instructions if instruction == "RUN"]
    assert any("pip install -r requirements.txt" in run for run in runs)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -r requirements.txt" in makefile  # make run's install step, the same file
    [user] = [argument for instruction, argument in instructions if instruction == "USER"]
    assert user not in ("root", "0") and any(f"--uid {user}" in run for run in runs)
    [cmd] = [argument for instruction, argument in instructions if instruction == "CMD"]
    assert script_of(yaml.safe_load(cmd)) == "run_web_server.py"  # exec form: a JSON list
    scripts = {script_of(yaml.safe_load(cmd))} | {
        script_of(service["command"]) for service in compose()["services"].values() if "build" in service
    }
    assert scripts == {"run_web_server.py", "run_model_server.py"} and all((ROOT / s).is_file() for s in scripts)
    assert f"-t {IMAGE}" in (DEPLOY / "Dockerfile").read_text()  # the build line names the image we deploy
    env_lines = [argument for instruction, argument in instructions if instruction == "ENV"]
    environment = dict(pair.split("=", 1) for line in env_lines for pair in line.split())
    pip_variables = {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
    assert set(environment) <= SETTINGS_VARIABLES | OTHER_VARIABLES | pip_variables
    assert Settings.from_env(environment).host == "0.0.0.0"
