"""deploy/kuberay/: the manifests parse, the RayJob's entrypoint is a real CLI command with real
options and config fields, the RayCluster's node groups carry the custom resources the 70B
recipe's pools ask for and hold every actor of it, the metrics ports agree everywhere, and
submitting code needs Ray's token (from a Secret) and a pod the NetworkPolicy admits."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer
import yaml

from actors.commands.cli import app
from rlhf_cluster.config import load_config
from rlhf_cluster.job.placement import check_placement, resource_plan

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"


def _manifest(name: str) -> dict:
    [doc] = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    return doc


def _entrypoint() -> tuple[str, list[str]]:
    words = shlex.split(_manifest("rayjob.yaml")["spec"]["entrypoint"])
    assert words[0] == "rlhf-cluster"
    return words[1], words[2:]


def _job_config():
    command, args = _entrypoint()
    config = args[0]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return load_config(REPO / config, sets)  # every --set names a real field, or this raises


def _nodes() -> list[dict[str, float]]:
    """Each node of the RayCluster as Ray will see it: its start params' CPUs, GPUs, resources."""
    spec = _manifest("raycluster.yaml")["spec"]
    nodes = []
    for group in [spec["headGroupSpec"] | {"replicas": 1}, *spec["workerGroupSpecs"]]:
        params = group["rayStartParams"]
        node = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
        node.update(json.loads(json.loads(params["resources"])) if "resources" in params else {})
        nodes += [dict(node) for _ in range(group["replicas"])]
    return nodes


def test_manifests_parse_with_their_kinds():
    kinds = {name: _manifest(name)["kind"] for name in ("raycluster.yaml", "rayjob.yaml", "podmonitor.yaml")}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "podmonitor.yaml": "PodMonitor"}
    assert _manifest("rayjob.yaml")["spec"]["clusterSelector"]["ray.io/cluster"] == _manifest("raycluster.yaml")["metadata"]["name"]


def test_the_entrypoint_names_only_documented_commands_options_and_fields():
    command, args = _entrypoint()
    cli = typer.main.get_command(app)
    assert command in cli.commands, f"rlhf-cluster has no command {command!r}"
    options = {opt for p in cli.commands[command].params if not getattr(p, "param_type_name", "") == "argument"
               for opt in getattr(p, "opts", [])}
    used = [a for a in args if a.startswith("--")]
    assert set(used) <= options, set(used) - options
    assert (REPO / args[0]).is_file()
    cfg = _job_config()
    assert cfg.metrics.bind_address == "0.0.0.0"  # scraped from other pods


def test_node_groups_carry_the_recipes_labels_and_hold_every_actor():
    cfg = _job_config()
    plan = resource_plan(cfg)
    custom = {k for req in plan for k in req.per_actor if k not in ("CPU", "GPU")}
    nodes = _nodes()
    declared = {k for node in nodes for k in node if k not in ("CPU", "GPU")}
    assert custom == declared == {"rlhf_generation", "rlhf_scoring", "rlhf_learner"}
    assert check_placement(plan, nodes) == []
    assert sum(n["GPU"] for n in nodes) == 72
    # And it is a tight fit: one generation node fewer cannot hold the recipe.
    fewer = nodes[:]
    fewer.remove(next(n for n in nodes if "rlhf_generation" in n))
    assert check_placement(plan, fewer)


def test_metrics_ports_agree_between_config_pods_and_podmonitor():
    first, last = _job_config().metrics.port_range
    wanted = set(range(first, last + 1))
    spec = _manifest("raycluster.yaml")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        [container] = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("rlhf-m")}
        assert set(ports.values()) == wanted, group.get("groupName", "head")
    scraped = {e["port"] for e in _manifest("podmonitor.yaml")["spec"]["podMetricsEndpoints"]}
    assert scraped == set(ports)
    labels = _manifest("podmonitor.yaml")["spec"]["selector"]["matchLabels"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert labels.items() <= group["template"]["metadata"]["labels"].items()


# ---- issue 34: submitting code needs the token, and only the submitter reaches the dashboard ----

DASHBOARD = 8265
TOKEN_SECRET = {"name": "rlhf-ray-token", "key": "auth_token"}


def _containers() -> dict[str, dict]:
    spec = _manifest("raycluster.yaml")["spec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    out.update({g["groupName"]: g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]})
    out["submitter"] = _manifest("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    return out


def test_every_ray_pod_and_the_submitter_require_the_token_from_a_secret():
    for name, container in _containers().items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET, name  # never a literal token
        assert "value" not in env["RAY_AUTH_TOKEN"], name


def test_the_dashboard_listens_on_the_pod_network_only():
    head = _manifest("raycluster.yaml")["spec"]["headGroupSpec"]
    host = head["rayStartParams"]["dashboard-host"]
    assert host == "$(POD_IP)" and host not in ("0.0.0.0", "::")
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def _admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:  # a rule without ports admits every port
        return True
    return any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)


def test_the_network_policy_admits_only_the_submitter_and_the_operator_to_the_dashboard():
    policy = _manifest("networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    cluster = _manifest("raycluster.yaml")["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    sources = []
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod and address"
        if _admits(rule, DASHBOARD):
            sources += rule["from"]
    assert sources and all("ipBlock" not in s and s["podSelector"]["matchLabels"] for s in sources)
    labels = [s["podSelector"]["matchLabels"] for s in sources]
    assert labels == [{"rlhf-cluster/role": "submitter"}, {"app.kubernetes.io/name": "kuberay-operator"}]
    submitter = _manifest("rayjob.yaml")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert labels[0].items() <= submitter.items()
    # The cluster's own pods reach every port Ray uses between nodes (fixed, not random), but not 8265.
    params = _manifest("raycluster.yaml")["spec"]["headGroupSpec"]["rayStartParams"]
    inner = [r for r in policy["spec"]["ingress"] if r["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": cluster}}}]]
    fixed = [6379, 10001] + [int(params[k]) for k in ("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                                                      "dashboard-agent-grpc-port", "metrics-export-port",
                                                      "dashboard-agent-listen-port", "min-worker-port", "max-worker-port")]
    assert len(inner) == 1 and all(_admits(inner[0], port) for port in fixed) and not _admits(inner[0], DASHBOARD)
