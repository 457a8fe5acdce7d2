"""What a schema cannot see in the rendered manifests: the pieces have to fit each other.

    python3 check_manifests.py OVERLAY.yaml... --adapter ADAPTER.yaml

Run by validate.sh after kubernetes-validate. Checks the ServiceMonitor against a strict
schema of the fields this repository uses (kubernetes-validate bundles only the built-in
kinds' schemas, not prometheus-operator's CRDs), then the cross-references: selectors that
select, port names that exist, the drain timing, the probes' paths, the non-root user of the
image, and that the HPA asks for the metric name the prometheus-adapter rule produces from a
series the daemon exports. The router overlays get the same for what sits in front: the
vllm-router overlay's discovery, RBAC and KV-event ports; the llm-d overlay's Gateway API and
inference-extension objects (strict schemas of the fields used, as for the ServiceMonitor) and
the endpoint picker's configuration against the replicas it routes to.
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


def strict(properties, required=()):
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": properties}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}


def crd(api_version, kind, spec):
    return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                   "metadata": {"type": "object"}, "spec": spec},
                  ["apiVersion", "kind", "metadata", "spec"])


# inference.networking.k8s.io/v1 InferencePool (gateway-api-inference-extension v1.x CRD):
# selector.matchLabels and 1-8 unique targetPorts are required; the picker is a Service port.
INFERENCE_POOL = crd("inference.networking.k8s.io/v1", "InferencePool", strict({
    "selector": strict({"matchLabels": STRING_MAP}, ["matchLabels"]),
    "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True,
                    "items": strict({"number": PORT}, ["number"])},
    "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
    "endpointPickerRef": strict({
        "group": {"type": "string"},
        "kind": {"type": "string"},
        "name": NAME,
        "port": strict({"number": PORT}, ["number"]),
        "failureMode": {"enum": ["FailOpen", "FailClose"]},
    }, ["name", "port"]),
}, ["selector", "targetPorts"]))

# gateway.networking.k8s.io/v1 Gateway and HTTPRoute, the fields used here.
GATEWAY = crd("gateway.networking.k8s.io/v1", "Gateway", strict({
    "gatewayClassName": NAME,
    "listeners": {"type": "array", "minItems": 1, "items": strict({
        "name": NAME,
        "protocol": {"enum": ["HTTP", "HTTPS", "TLS", "TCP", "UDP"]},
        "port": PORT,
        "hostname": {"type": "string"},
    }, ["name", "protocol", "port"])},
}, ["gatewayClassName", "listeners"]))

DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
HTTP_ROUTE = crd("gateway.networking.k8s.io/v1", "HTTPRoute", strict({
    "parentRefs": {"type": "array", "minItems": 1, "items": strict({
        "group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME,
        "namespace": NAME, "sectionName": NAME,
    }, ["name"])},
    "hostnames": {"type": "array", "items": {"type": "string"}},
    "rules": {"type": "array", "minItems": 1, "items": strict({
        "matches": {"type": "array", "items": strict({
            "path": strict({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                            "value": {"type": "string", "pattern": "^/"}}),
        })},
        "backendRefs": {"type": "array", "minItems": 1, "items": strict({
            "group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME,
            "port": PORT, "weight": {"type": "integer", "minimum": 0},
        }, ["name"])},
        "timeouts": strict({"request": DURATION, "backendRequest": DURATION}),
    })},
}, ["parentRefs", "rules"]))

# networking.istio.io/v1 DestinationRule: TLS towards the endpoint picker.
DESTINATION_RULE = crd("networking.istio.io/v1", "DestinationRule", strict({
    "host": {"type": "string"},
    "trafficPolicy": strict({"tls": strict({
        "mode": {"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
        "insecureSkipVerify": {"type": "boolean"},
    }, ["mode"])}),
}, ["host"]))

# The endpoint picker's own file (llm-d-router v0.10 EndpointPickerConfig).
PLUGIN_REF = strict({"pluginRef": {"type": "string"}, "weight": {"type": "number"}},
                    ["pluginRef"])
EPP_CONFIG = strict({
    "apiVersion": {"const": "llm-d.ai/v1alpha1"},
    "kind": {"const": "EndpointPickerConfig"},
    "plugins": {"type": "array", "minItems": 1, "items": strict({
        "type": {"type": "string"}, "name": {"type": "string"},
        "parameters": {"type": "object"},
    }, ["type"])},
    "dataLayer": strict({"sources": {"type": "array", "items": strict({
        "pluginRef": {"type": "string"},
        "extractors": {"type": "array", "items": strict({"pluginRef": {"type": "string"}},
                                                          ["pluginRef"])},
    }, ["pluginRef"])}}),
    "schedulingProfiles": {"type": "array", "minItems": 1, "items": strict({
        "name": {"type": "string"},
        "plugins": {"type": "array", "minItems": 1, "items": PLUGIN_REF},
    }, ["name", "plugins"])},
}, ["apiVersion", "kind", "plugins", "schedulingProfiles"])

SCHEMAS = {"InferencePool": INFERENCE_POOL, "Gateway": GATEWAY, "HTTPRoute": HTTP_ROUTE,
           "DestinationRule": DESTINATION_RULE, "ServiceMonitor": SERVICE_MONITOR}

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


def named(docs, kind, name, where):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    check(len(found) == 1, f"{where}: expected one {kind} {name}, found {len(found)}")
    return found[0] if found else None


def check_overlay(path, adapter_metric):
    where = path.name
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if d["kind"] in SCHEMAS and d["kind"] != "ServiceMonitor":
            try:
                jsonschema.validate(d, SCHEMAS[d["kind"]])
            except jsonschema.ValidationError as e:
                check(False, f"{where}: {d['kind']} {d['metadata']['name']}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}")
    dep = named(docs, "Deployment", "distillery", where)
    svc = named(docs, "Service", "distillery", where)
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

    replicas = Replicas(dep, c, env, svc)
    if any(d["kind"] == "Deployment" and d["metadata"]["name"] == "distillery-router"
           for d in docs):
        check_vllm_router(docs, where, replicas)
    if any(d["kind"] == "InferencePool" for d in docs):
        check_llm_d(docs, where, replicas)


class Replicas:
    """The distillery pods an overlay puts behind a router: what the router must match."""

    def __init__(self, dep, container, env, svc):
        self.labels = dep["spec"]["template"]["metadata"]["labels"]
        self.container = container
        self.env = dict(env)
        for e in container.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
        self.ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.service = svc

    def endpoint_port(self, var):
        """The port of a tcp://HOST:PORT setting, or None."""
        m = re.fullmatch(r"tcp://[^:]+:([0-9]+)", self.env.get(var, ""))
        return int(m.group(1)) if m else None


def flag(args, name):
    """The value of --name=V or --name V (the words up to the next flag for a list)."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}":
            rest = []
            for b in args[i + 1:]:
                if b.startswith("--"):
                    break
                rest.append(b)
            return " ".join(rest)
    return None


def grants(docs, account, group, resource, verbs, where):
    """Whether a RoleBinding gives the ServiceAccount a Role with these verbs on the resource."""
    for rb in (d for d in docs if d["kind"] == "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in rb["subjects"]):
            continue
        role = [d for d in docs if d["kind"] == rb["roleRef"]["kind"]
                and d["metadata"]["name"] == rb["roleRef"]["name"]]
        for r in role:
            for rule in r["rules"]:
                if (group in rule["apiGroups"] and resource in rule["resources"]
                        and set(verbs) <= set(rule["verbs"])):
                    return True
    check(False, f"{where}: ServiceAccount {account} may not {'/'.join(verbs)} {resource}")
    return False


def pod_and_container(dep):
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    return pod, c


def check_fronting_service(docs, name, pod, c, where):
    svc = named(docs, "Service", name, where)
    if svc:
        check(subset(svc["spec"]["selector"], pod["metadata"]["labels"]),
              f"{where}: Service {name} selects no {name} pod")
        names = {p["name"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in names, f"{where}: Service {name} port {p['targetPort']}")
    return svc


def check_vllm_router(docs, where, replicas):
    dep = named(docs, "Deployment", "distillery-router", where)
    if not dep:
        return
    pod, c = pod_and_container(dep)
    args = c["args"]
    # Discovery: the label selector finds the replicas (not the router), on their HTTP port,
    # in the namespace the RBAC covers.
    selector = dict(kv.split("=", 1) for kv in (flag(args, "selector") or "").split())
    check("--service-discovery" in args and selector, f"{where}: router without discovery")
    check(subset(selector, replicas.labels), f"{where}: router selector finds no replica")
    check(not subset(selector, pod["metadata"]["labels"]), f"{where}: router selects itself")
    check(flag(args, "service-discovery-port") == str(replicas.ports.get("http")),
          f"{where}: router discovery port is not the replicas' http port")
    ns = flag(args, "service-discovery-namespace")
    env = {e["name"]: e for e in c.get("env", [])}
    check(ns == "$(POD_NAMESPACE)" and env.get("POD_NAMESPACE", {}).get("valueFrom", {})
          .get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
          f"{where}: router should watch its own namespace (POD_NAMESPACE from the downward API)")
    account = pod["spec"].get("serviceAccountName")
    check(pod["spec"].get("automountServiceAccountToken") is True,
          f"{where}: the router needs its service-account token to watch pods")
    grants(docs, account, "", "pods", ["get", "list", "watch"], where)
    # The policy's needs from the replicas.
    check(replicas.env.get("DISTILLERY_GET_LOAD_FORMAT") == "vllm",
          f"{where}: replicas must answer /get_load in vllm-router's shape")
    if flag(args, "policy") == "kv_aware":
        for var, port in [("DISTILLERY_KV_EVENTS_ENDPOINT", "kv-events"),
                          ("DISTILLERY_KV_EVENTS_REPLAY_ENDPOINT", "kv-replay")]:
            check(replicas.endpoint_port(var) is not None
                  and replicas.endpoint_port(var) == replicas.ports.get(port),
                  f"{where}: {var} is not on the replicas' {port} container port")
    check_fronting_service(docs, "distillery-router", pod, c, where)
    uid = re.search(r"--uid ([0-9]+)", (ROOT / "deploy/router/Dockerfile").read_text())
    check(uid and int(uid.group(1)) == c["securityContext"].get("runAsUser"),
          f"{where}: router runAsUser differs from deploy/router/Dockerfile's user")


def check_llm_d(docs, where, replicas):
    pool = one(docs, "InferencePool", where)
    gateway = one(docs, "Gateway", where)
    route = one(docs, "HTTPRoute", where)
    dep = named(docs, "Deployment", "distillery-epp", where)
    if None in (pool, gateway, route, dep) or not all(
            jsonschema.Draft7Validator(SCHEMAS[d["kind"]]).is_valid(d)
            for d in (pool, gateway, route)):
        return  # already reported
    pod, c = pod_and_container(dep)
    # The pool is the replicas, on their HTTP port; the picker is the EPP's gRPC Service port.
    spec = pool["spec"]
    check(subset(spec["selector"]["matchLabels"], replicas.labels),
          f"{where}: InferencePool selects no replica")
    check(not subset(spec["selector"]["matchLabels"], pod["metadata"]["labels"]),
          f"{where}: InferencePool selects the endpoint picker")
    check([p["number"] for p in spec["targetPorts"]] == [replicas.ports.get("http")],
          f"{where}: InferencePool targetPorts are not the replicas' http port")
    svc = check_fronting_service(docs, spec["endpointPickerRef"]["name"], pod, c, where)
    if svc:
        grpc = [p for p in svc["spec"]["ports"] if p["port"] == spec["endpointPickerRef"]["port"]["number"]]
        check(len(grpc) == 1 and grpc[0]["targetPort"] == "grpc",
              f"{where}: endpointPickerRef port is not the EPP's gRPC port")
    # The route: Gateway -> pool.
    check(any(r["name"] == gateway["metadata"]["name"] for r in route["spec"]["parentRefs"]),
          f"{where}: HTTPRoute is not attached to the Gateway")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    check(backends and all(b.get("kind") == "InferencePool"
                           and b.get("group") == "inference.networking.k8s.io"
                           and b["name"] == pool["metadata"]["name"] for b in backends),
          f"{where}: HTTPRoute does not send to the InferencePool")
    for dr in (d for d in docs if d["kind"] == "DestinationRule"):
        check(dr["spec"]["host"] == spec["endpointPickerRef"]["name"],
              f"{where}: DestinationRule is not for the endpoint picker's Service")
    # The EPP: its pool, its RBAC, its probes, its configuration file.
    args = c["args"]
    check(flag(args, "pool-name") == pool["metadata"]["name"], f"{where}: EPP --pool-name")
    check(flag(args, "pool-group") == "inference.networking.k8s.io", f"{where}: EPP --pool-group")
    health = int(flag(args, "grpc-health-port") or 9003)
    for probe in ("livenessProbe", "readinessProbe"):
        check(c.get(probe, {}).get("grpc", {}).get("port") == health,
              f"{where}: EPP {probe} is not on its gRPC health port")
    account = pod["spec"].get("serviceAccountName")
    grants(docs, account, "", "pods", ["get", "list", "watch"], where)
    grants(docs, account, "inference.networking.k8s.io", "inferencepools",
           ["get", "list", "watch"], where)
    config = epp_config(docs, pod, c, flag(args, "config-file"), where)
    if config is not None:
        check_epp_config(config, replicas, where)


def epp_config(docs, pod, c, path, where):
    """The EndpointPickerConfig the EPP reads, from the ConfigMap mounted at its path."""
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
    directory, _, key = (path or "").rpartition("/")
    volume = {v["name"]: v for v in pod["spec"]["volumes"]}.get(mounts.get(directory), {})
    name = volume.get("configMap", {}).get("name")
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    if not cms or key not in cms[0].get("data", {}):
        check(False, f"{where}: EPP --config-file {path} is not a rendered ConfigMap's key")
        return None
    config = yaml.safe_load(cms[0]["data"][key])
    try:
        jsonschema.validate(config, EPP_CONFIG)
    except jsonschema.ValidationError as e:
        check(False, f"{where}: EndpointPickerConfig: {'.'.join(map(str, e.path))}: {e.message}")
        return None
    return config


def check_epp_config(config, replicas, where):
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    refs = [r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]]
    for src in config.get("dataLayer", {}).get("sources", []):
        refs += [src["pluginRef"]] + [e["pluginRef"] for e in src.get("extractors", [])]
    for ref in refs:
        check(ref in plugins, f"{where}: EndpointPickerConfig refers to undeclared plugin {ref}")
    served = replicas.env.get("DISTILLERY_SERVED_MODEL_NAME")
    # Tokens come from the replicas' render endpoints, through their Service.
    tokens = plugins.get("token-producer", {}).get("parameters", {})
    check(tokens.get("modelName") == served,
          f"{where}: token-producer modelName {tokens.get('modelName')} is not {served}")
    svc = replicas.service
    url = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    check(tokens.get("vllm", {}).get("url") == url,
          f"{where}: token-producer should render through {url}")
    # Events: the port the EPP dials is the one the replicas publish on, and the topic passes
    # its filter and names the pod and the served model.
    events = plugins.get("precise-prefix-cache-producer", {}).get("parameters", {})
    kv = events.get("kvEventsConfig", {})
    port = kv.get("podDiscoveryConfig", {}).get("socketPort")
    check(kv.get("discoverPods") is True and port is not None
          and port == replicas.endpoint_port("DISTILLERY_KV_EVENTS_ENDPOINT")
          and port == replicas.ports.get("kv-events"),
          f"{where}: the EPP dials port {port}, the replicas publish elsewhere")
    topic = replicas.env.get("DISTILLERY_KV_EVENTS_TOPIC", "")
    check(topic.startswith(kv.get("topicFilter", "kv@")),
          f"{where}: topic {topic!r} does not pass the EPP's filter")
    check(topic == f"kv@$(POD_IP):{replicas.ports.get('http')}@{served}",
          f"{where}: topic {topic!r} is not kv@$(POD_IP):PORT@SERVED_MODEL_NAME")
    env = [e["name"] for e in replicas.container.get("env", [])]
    pod_ip = [e for e in replicas.container.get("env", []) if e["name"] == "POD_IP"]
    check(pod_ip and pod_ip[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
          == "status.podIP" and env.index("POD_IP") < env.index("DISTILLERY_KV_EVENTS_TOPIC"),
          f"{where}: POD_IP must come from status.podIP, before the topic that uses it")


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
