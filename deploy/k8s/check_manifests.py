"""What a schema cannot see in the rendered manifests: the pieces have to fit each other.

    python3 check_manifests.py OVERLAY.yaml... --adapter ADAPTER.yaml

Run by validate.sh after kubernetes-validate. Checks the ServiceMonitor against a strict
schema of the fields this repository uses (kubernetes-validate bundles only the built-in
kinds' schemas, not prometheus-operator's CRDs), then the cross-references: selectors that
select, port names that exist, the drain timing, the probes' paths, the non-root user of the
image, and that the HPA asks for the metric name the prometheus-adapter rule produces from a
series the daemon exports.
"""

import argparse
import pathlib
import re
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The subset of monitoring.coreos.com/v1 ServiceMonitor that deploy/k8s uses, with unknown
# fields rejected so that a typo fails here rather than being dropped by the API server.
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": r"^[0-9]+(ms|s|m|h)$",
                            },
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}

errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)


def seconds(duration):
    n, unit = re.fullmatch(r"([0-9]+)(ms|s|m|h)", duration).groups()
    return int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def one(docs, kind, where):
    found = [d for d in docs if d["kind"] == kind]
    check(len(found) == 1, f"{where}: expected one {kind}, found {len(found)}")
    return found[0] if found else None


def check_overlay(path, adapter_metric):
    where = path.name
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    dep = one(docs, "Deployment", where)
    svc = one(docs, "Service", where)
    pdb = one(docs, "PodDisruptionBudget", where)
    hpa = one(docs, "HorizontalPodAutoscaler", where)
    sm = one(docs, "ServiceMonitor", where)
    pvc = one(docs, "PersistentVolumeClaim", where)
    if None in (dep, svc, pdb, hpa, sm, pvc):
        return
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in c["ports"]}

    # Selectors select, ports exist.
    check(subset(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: Deployment selector")
    check(subset(svc["spec"]["selector"], pod_labels), f"{where}: Service selects no pod")
    check(subset(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: PDB selects no pod")
    for p in svc["spec"]["ports"]:
        check(p["targetPort"] in port_names or isinstance(p["targetPort"], int),
              f"{where}: Service targetPort {p['targetPort']} is not a container port")
    try:
        jsonschema.validate(sm, SERVICE_MONITOR)
    except jsonschema.ValidationError as e:
        check(False, f"{where}: ServiceMonitor: {'.'.join(map(str, e.path))}: {e.message}")
        return
    check(subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
          f"{where}: ServiceMonitor selects no Service")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        check(ep["port"] in svc_ports, f"{where}: ServiceMonitor port {ep['port']} not on the Service")
        check(ep.get("path", "/metrics") == "/metrics", f"{where}: ServiceMonitor path")
        if "scrapeTimeout" in ep and "interval" in ep:
            check(seconds(ep["scrapeTimeout"]) <= seconds(ep["interval"]),
                  f"{where}: scrapeTimeout longer than interval")

    # Probes: the daemon's endpoints, and a start-up allowance for a model load.
    for probe, path in [("startupProbe", "/health"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/health")]:
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{where}: {probe} should GET {path}")
        check(get.get("port") in port_names, f"{where}: {probe} port is not a container port")
    sp = c["startupProbe"]
    check(sp["periodSeconds"] * sp["failureThreshold"] >= 300,
          f"{where}: startupProbe allows under 5 minutes for the model to load")

    # Drain timing: the grace period covers preStop's sleep, then the daemon's own grace.
    env = {}
    for ref in c.get("envFrom", []):
        name = ref["configMapRef"]["name"]
        cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        check(len(cms) == 1, f"{where}: envFrom names ConfigMap {name}, not rendered")
        for cm in cms:
            env.update(cm.get("data", {}))
    check(all(k.startswith(("DISTILLERY_", "HF_", "RAYON_")) for k in env),
          f"{where}: unexpected variables in the env ConfigMap: {sorted(env)}")
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    check(cmd[0] == "sleep" and len(cmd) == 2, f"{where}: preStop should be [sleep, N]")
    pre_stop = float(cmd[1])
    grace = float(env.get("DISTILLERY_SHUTDOWN_GRACE", 30))
    tgps = pod["spec"]["terminationGracePeriodSeconds"]
    check(tgps > pre_stop + grace,
          f"{where}: terminationGracePeriodSeconds {tgps} <= preStop {pre_stop} + drain {grace}")

    # Hardening, and the uid the image runs as.
    sc = c["securityContext"]
    check(sc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
          and sc.get("allowPrivilegeEscalation") is False
          and sc.get("capabilities", {}).get("drop") == ["ALL"],
          f"{where}: container securityContext not hardened")
    user = re.search(r"^USER ([0-9]+)", (ROOT / "deploy/Dockerfile").read_text(), re.M)
    check(user and int(user.group(1)) == sc.get("runAsUser"),
          f"{where}: runAsUser differs from the Dockerfile's USER")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    check(mounts.get("models", {}).get("mountPath") == "/models", f"{where}: /models mount")
    check(vols.get("models", {}).get("persistentVolumeClaim", {}).get("claimName")
          == pvc["metadata"]["name"], f"{where}: models volume is not the rendered PVC")
    check("emptyDir" in vols.get(mounts.get("tmp", {}).get("name", ""), {})
          and mounts["tmp"]["mountPath"] == "/tmp", f"{where}: /tmp is not an emptyDir")
    check(env.get("HF_HOME", "").startswith("/tmp/"), f"{where}: HF_HOME not on the /tmp emptyDir")

    # Autoscaler: its target, and a metric the adapter serves.
    ref = hpa["spec"]["scaleTargetRef"]
    check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"],
          f"{where}: HPA does not target the Deployment")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    check(names == [adapter_metric],
          f"{where}: HPA asks for {names}, the adapter serves {adapter_metric}")

    if "gpu" in where:
        limits = c["resources"]["limits"]
        check(limits.get("nvidia.com/gpu") == "1", f"{where}: no nvidia.com/gpu limit")


def adapter_metric(path):
    """The custom-metrics name the adapter rule gives distillery:num_requests_waiting."""
    series = "distillery:num_requests_waiting"
    src = (ROOT / "src/metrics/mod.rs").read_text()
    check('NATIVE_PREFIX: &str = "distillery:"' in src and '"num_requests_waiting"' in src,
          f"the daemon no longer exports {series} (src/metrics/mod.rs)")
    (cm,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    for rule in config["rules"]:
        selector = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])
        if not selector or not re.fullmatch(selector.group(1), series):
            continue
        check({"namespace", "pod"} <= set(rule["resources"]["overrides"]),
              "adapter rule does not map namespace and pod")
        as_ = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])
        return re.sub(rule["name"]["matches"], as_, series)
    check(False, f"no adapter rule matches {series}")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("overlays", nargs="+", type=pathlib.Path)
    ap.add_argument("--adapter", required=True, type=pathlib.Path)
    args = ap.parse_args()
    metric = adapter_metric(args.adapter)
    for path in args.overlays:
        check_overlay(path, metric)
    for e in errors:
        print(f"ERROR {e}")
    print(f"check_manifests: {len(args.overlays)} overlays, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
