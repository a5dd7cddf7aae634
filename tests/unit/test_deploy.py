"""deploy/ without a Docker engine or a cluster: every file parses, every local path it names exists, one
port everywhere, grace periods above the drain timeout, probes and health checks on /health, the server
flags are real sparse-serve flags, and every metric the Grafana dashboard and the HPA use is exported by a
live (tiny-model) server's /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from loadtests.promtext import metric_names
from sparse_serve.cli import build_parser
from sparse_serve.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


# -- loading --------------------------------------------------------------------------------------
def dockerfile() -> dict:
    """EXPOSE, USER, CMD, ENTRYPOINT, HEALTHCHECK and COPY sources of deploy/Dockerfile."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    out: dict = {"copy": []}
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word in ("CMD", "ENTRYPOINT") and rest.strip().startswith("["):
            out[word] = json.loads(rest)
        elif word == "COPY":
            out["copy"].append(rest.split()[0])
        elif word in ("EXPOSE", "USER", "HEALTHCHECK", "FROM"):
            out[word] = rest.strip()
    return out


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_docs() -> dict[tuple[str, str], dict]:
    """Every Kubernetes object under deploy/k8s, keyed by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and "metadata" in doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def deployment() -> dict:
    return k8s_docs()[("Deployment", "sparse-serve")]


def server_container() -> dict:
    return next(c for c in deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == "server")


def flag(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def server_commands() -> dict[str, list[str]]:
    """Every sparse-serve argument list in deploy/: the image's CMD, the compose servers, the k8s container."""
    c = compose()["services"]
    return {"Dockerfile CMD": dockerfile()["CMD"], "compose sparse": c["sparse"]["command"],
            "compose dense": c["dense"]["command"], "k8s server": server_container()["args"]}


# -- parsing and paths ----------------------------------------------------------------------------
def test_every_file_parses():
    yaml_files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")]
    assert len(yaml_files) >= 10
    for path in yaml_files:
        assert list(yaml.safe_load_all(path.read_text())), path
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())
    assert dockerfile()["FROM"] and dockerfile()["CMD"]


def test_every_local_path_exists():
    for src in dockerfile()["copy"]:  # the build context is the repository root
        assert (REPO / src).exists(), f"Dockerfile COPY {src}"
    for name, svc in compose()["services"].items():
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context == REPO, name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    for resource in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        assert (K8S / resource).is_file(), resource
    locust_file = compose()["services"]["locust"]["command"][1]
    assert locust_file.startswith("/opt/sparse-serve/")  # the image's WORKDIR holds the repository's files
    assert (REPO / locust_file.removeprefix("/opt/sparse-serve/")).is_file()


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"][0]
    dash_dir = DEPLOY / mounts[provider["options"]["path"]]
    assert (dash_dir / "sparse-serve.json").is_file()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"])
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    datasource = datasources["datasources"][0]
    assert urlsplit(datasource["url"]).hostname in compose()["services"]


# -- ports, flags, probes, grace periods ----------------------------------------------------------
def test_server_commands_are_valid_sparse_serve_flags():
    parser = build_parser()
    for where, args in server_commands().items():
        parsed = parser.parse_args(args)
        assert parsed.host == "0.0.0.0", f"{where}: inside a container the server must bind 0.0.0.0"
    assert dockerfile()["ENTRYPOINT"] == ["sparse-serve"]


def test_one_port_everywhere():
    port = int(dockerfile()["EXPOSE"])
    for where, args in server_commands().items():
        assert int(flag(args, "--port")) == port, where
    assert f"127.0.0.1:{port}/health" in dockerfile()["HEALTHCHECK"]
    services = compose()["services"]
    for name in ("sparse", "dense"):
        svc = services[name]
        assert [int(p) for p in svc["expose"]] == [port]
        host_ip, _, container = svc["ports"][0].rpartition(":")
        assert int(container) == port and host_ip.startswith("127.0.0.1:"), svc["ports"]
        assert f"127.0.0.1:{port}/health" in " ".join(svc["healthcheck"]["test"])
    for svc in services.values():  # every published port on the host's loopback only
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", [])), svc.get("ports")
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"dense:{port}", f"sparse:{port}"]
    locust = services["locust"]
    target = urlsplit(locust["command"][locust["command"].index("--host") + 1])
    assert target.port == port and target.hostname in services
    assert target.hostname in locust["environment"]["SPARSE_SERVE_LOADTEST_ALLOW_HOSTS"].split(",")
    container = server_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"http": port}
    service = k8s_docs()[("Service", "sparse-serve")]["spec"]
    assert [(p["port"], named[p["targetPort"]]) for p in service["ports"]] == [(port, port)]
    assert service["selector"].items() <= deployment()["spec"]["template"]["metadata"]["labels"].items()
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics"


def test_probes_and_health_checks_hit_health():
    container = server_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load + kernel compile
    assert "/health" in dockerfile()["HEALTHCHECK"] and "--start-period=300s" in dockerfile()["HEALTHCHECK"]
    for name in ("sparse", "dense"):
        assert "/health" in " ".join(compose()["services"][name]["healthcheck"]["test"])


def test_grace_periods_exceed_the_drain_timeout():
    default = ServerConfig().drain_timeout_s
    k8s_args = server_container()["args"]
    drain = float(flag(k8s_args, "--drain-timeout-s", default))
    assert deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    for name in ("sparse", "dense"):
        svc = compose()["services"][name]
        drain = float(flag(svc["command"], "--drain-timeout-s", default))
        assert float(svc["stop_grace_period"].removesuffix("s")) > drain, name


def test_api_key_from_a_secret_and_non_root():
    env = {e["name"]: e for e in server_container()["env"]}
    ref = env["SPARSE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == ref["name"] and ref["key"] in secret["stringData"]
    assert "secret.example.yaml" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert dockerfile()["USER"] not in ("root", "0")
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s_docs()
    model_arg = server_container()["args"][0]
    mounts = [m["mountPath"] for m in server_container()["volumeMounts"] if m["name"] == "models"]
    assert any(model_arg.startswith(m) for m in mounts)


# -- metric names against a live server -----------------------------------------------------------
def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or
    Grafana variables (label matchers, ranges, grouping clauses and strings removed first)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[m.end():].lstrip()[:1]
        if following != "(" and m.group(0).lower() not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def test_promql_metric_extraction():
    expr = 'histogram_quantile(0.9, sum by (le, variant) (rate(vllm:x_bucket{a=~"$v"}[$__rate_interval])))'
    assert promql_metrics(expr) == {"vllm:x_bucket"}
    assert promql_metrics("label_values(vllm:num_requests_running, variant)") == {"vllm:num_requests_running",
                                                                                   "variant"}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana/dashboards/sparse-serve.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def dashboard_template_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana/dashboards/sparse-serve.json").read_text())
    queries = [var["query"]["query"] for var in dash["templating"]["list"] if isinstance(var.get("query"), dict)]
    return {m.group(1).strip() for q in queries if (m := re.match(r"label_values\(([^,]+),", q))}


def test_dashboard_covers_the_required_panels():
    exprs = " ".join(dashboard_exprs())
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le, variant) (rate(vllm:{hist}_bucket" in exprs, (hist, q)
    for metric in ("vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc"):
        assert metric in exprs
    assert all("variant" in e for e in dashboard_exprs())  # every panel split by variant


def test_dashboard_and_hpa_use_only_exported_metrics(tiny_server_url):
    exported = metric_names(httpx.get(f"{tiny_server_url}/metrics", timeout=10).text)
    used = {name for e in dashboard_exprs() for name in promql_metrics(e)} | dashboard_template_metrics()
    assert used and not used - exported, f"not exported by the server: {sorted(used - exported)}"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    hpa = k8s_docs()[("HorizontalPodAutoscaler", "sparse-serve")]["spec"]
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["metrics"]}
    assert hpa_metrics <= {rule["name"]["as"] for rule in adapter}
    for rule in adapter:
        template = rule["metricsQuery"].replace("<<", "").replace(">>", "")
        series = promql_metrics(rule["seriesQuery"]) | promql_metrics(template)
        assert series and series <= exported, series - exported
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), next(iter(promql_metrics(rule["seriesQuery"]))))
    assert hpa["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    assert "vllm:num_requests_waiting" in exported


@pytest.mark.parametrize("path", ["docker-compose.yml", "README.md", "Dockerfile"])
def test_documentation_states_the_binding(path):
    text = (DEPLOY / path).read_text()
    assert "0.0.0.0" in text and "127.0.0.1" in text
