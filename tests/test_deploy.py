"""deploy/: every kustomization renders, every object validates against the Kubernetes schemas
(kubernetes-validate's bundled schemas, offline), and nothing drifts from the CLI: every KVXFER_*
variable, flag and port in the manifests exists and agrees with kvxfer.daemons.config. The vLLM
overlay's pods load KvxferConnector with settings its own parser accepts, with the key files their
volumes and init container lay out."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kvxfer.daemons.auth import KEY_ONLY_ENV_VARS, add_api_key_arguments, add_backend_key_arguments
from kvxfer.daemons.backends import add_backend_arguments
from kvxfer.daemons.config import (
    CURVE_KEY_ENV_VARS,
    Device,
    ProxyConfig,
    Role,
    ServeConfig,
    add_proxy_arguments,
    add_serve_arguments,
    env_var,
    proxy_config_from_args,
    serve_config_from_args,
)

VENV_KVXFER = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "kvxfer"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OVERLAYS = ("cpu-demo", "gpu", "rdma")
KUSTOMIZATIONS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
VLLM = "overlays/vllm"  # vLLM pods with KvxferConnector, no kvxfer daemon: tests of its own below
VLLM_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
K8S_VERSION = "1.32.0"  # the kubectl on the project's machines
SECRET_NAME = "kvxfer-curve-keys"
SECRET_KEYS = {"prefill.key", "prefill.key_secret", "decode.key", "decode.key_secret"}
API_KEY_SECRET = "kvxfer-api-keys"  # optional: without it the HTTP API is open (docs/security.md)
PLACEHOLDER_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # any valid Z85 key
POD_IP = "10.244.0.7"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / kustomization)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(objects: tuple[dict, ...], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"kvxfer {command}", exit_on_error=False)
    (add_serve_arguments if command == "serve" else add_proxy_arguments)(parser)
    add_api_key_arguments(parser)
    if command == "proxy":
        add_backend_arguments(parser)
        add_backend_key_arguments(parser)
    return parser


def _negation(flag: str, action: argparse.Action) -> bool:
    return flag.startswith("--no-") and f"--{flag[5:]}" in action.option_strings


def cli_env_vars(command: str) -> set[str]:
    # a switch's "--no-" form reads its variable (`--rehearse`, `--warmup`: KVXFER_REHEARSE=off)
    flags = {f for a in parser_for(command)._actions for f in a.option_strings
             if f.startswith("--") and f != "--help" and not _negation(f, a)}
    names = {env_var(f) for f in flags}
    return names | (set(CURVE_KEY_ENV_VARS) if command == "serve" else set(KEY_ONLY_ENV_VARS))


def resolve_env(container: dict, *, pod_name: str = "kvxfer-pod-0", pod_ip: str = POD_IP,
                secret: dict[str, str] | None = None, api_keys: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The container's environment as a process would see it; downward-API and Secret references
    are filled with `pod_name`, `pod_ip`, `secret` (default: a placeholder key) and `api_keys`
    (default: no API-key Secret)."""
    env = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = pod_ip
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
        elif ref.get("secretKeyRef", {}).get("name") == API_KEY_SECRET:
            if api_keys is not None:  # else: the Secret is absent, and so is the variable
                env[item["name"]] = api_keys[ref["secretKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            assert key_ref["name"] == SECRET_NAME and key_ref["key"] in SECRET_KEYS, key_ref
            env[item["name"]] = (secret or {}).get(key_ref["key"], PLACEHOLDER_KEY)
        else:
            raise AssertionError(f"unsupported env source {item}")
    return env


def workloads(kustomization: str):
    """(deployment, container, config) for every kvxfer container of the rendered objects."""
    for deployment in of_kind(render(kustomization), "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container, config_of(container)


def config_of(container: dict, env: dict[str, str] | None = None) -> ServeConfig | ProxyConfig:
    """Parse the container's command line with the CLI's own parser and build its config."""
    assert container["command"] == ["kvxfer"], container["command"]
    command, *argv = container["args"]
    parser = parser_for(command)
    args = parser.parse_args(argv)  # an unknown flag raises here
    env = resolve_env(container) if env is None else env
    if command == "serve":
        return serve_config_from_args(args, environ=env)
    return proxy_config_from_args(args, environ=env)


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders(kustomization):
    objects = render(kustomization)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name in ("kvxfer-prefill", "kvxfer-decode", "kvxfer-proxy"):
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
            assert (kind, name) in kinds
    if kustomization != "base":
        assert {o["metadata"].get("namespace") for o in objects} == {"kvxfer"}


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_validate_against_kubernetes_schemas(kustomization):
    kv = pytest.importorskip("kubernetes_validate")
    for obj in render(kustomization):
        kv.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError with the field path


def test_schema_validation_catches_a_misspelled_field():
    kv = pytest.importorskip("kubernetes_validate")
    bad = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
           "spec": {"maxUnavailabel": 1, "selector": {"matchLabels": {"a": "b"}}}}  # fmt: skip
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_and_flag_exists_in_the_cli(overlay):
    for _, container, _ in workloads(f"overlays/{overlay}"):
        command = container["args"][0]
        used = {e["name"] for e in container.get("env", []) if e["name"].startswith("KVXFER_")}
        assert used <= cli_env_vars(command), used - cli_env_vars(command)
        for arg in container["args"][1:]:
            assert not arg.startswith("--") or arg.split("=")[0] in parser_for(command)._option_string_actions


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_metrics_agree_with_the_config(overlay):
    for deployment, container, config in workloads(f"overlays/{overlay}"):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"http": config.port}
        if isinstance(config, ServeConfig):
            expected |= {f"side-{rank}": port for rank, port in enumerate(config.side_channel_ports)}
        assert ports == expected, deployment["metadata"]["name"]
        for probe, path in (("startupProbe", None), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            get = container[probe]["httpGet"]
            assert get["port"] in ("http", config.port) and (path is None or get["path"] == path)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(config.port)
        assert annotations["prometheus.io/path"] == "/metrics"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_proxy_urls_point_at_real_ports(overlay):
    objects = render(f"overlays/{overlay}")
    deployments, services = of_kind(objects, "Deployment"), of_kind(objects, "Service")
    for service in services.values():
        selected = [d for d in deployments.values() if _selects(service["spec"]["selector"], d)]
        assert len(selected) == 1, service["metadata"]["name"]
        names = {p["name"] for c in _containers(selected[0]) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    proxy = config_of(_containers(deployments["kvxfer-proxy"])[0])
    for url in proxy.prefill_urls + proxy.decode_urls:
        host, port = re.fullmatch(r"https?://([^:/]+):(\d+)", url).groups()
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, url
        target = config_of(_containers(_selected(services[host], deployments))[0])
        assert target.port == int(port)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pools_agree_on_the_model_and_fit_their_gpus(overlay):
    configs = {c.role: c for _, _, c in workloads(f"overlays/{overlay}") if isinstance(c, ServeConfig)}
    prefill, decode = configs[Role.PREFILL], configs[Role.DECODE]
    for field in ("model_dir", "preset", "seed", "dtype"):  # otherwise the transferred KV is garbage
        assert getattr(prefill, field) == getattr(decode, field), field
    for deployment, container, config in workloads(f"overlays/{overlay}"):
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if isinstance(config, ServeConfig) and config.device is Device.CUDA:
            assert gpus == config.tp, deployment["metadata"]["name"]
        else:
            assert gpus is None
    engine_config = pytest.importorskip("kvxfer.engine.config")
    if prefill.preset is not None:
        for config in (prefill, decode):
            engine_config.preset(config.preset).check_tp(config.tp)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_curve_is_on_and_each_pod_gets_only_its_own_secret(overlay):
    for deployment, container, config in workloads(f"overlays/{overlay}"):
        if not isinstance(config, ServeConfig):
            continue
        assert not config.insecure_plaintext and config.curve is not None
        role, peer = config.role.value, ("decode" if config.role is Role.PREFILL else "prefill")
        secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
                       if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET_NAME}
        files = _secret_files(deployment, container)
        assert secret_refs == {f"{role}.key_secret"} and set(files.values()) == {f"{peer}.key"}
        assert files[str(config.curve.server_key_file)] == f"{peer}.key"
        allowed = [path for path in files if path.startswith(f"{config.curve.allowed_keys_dir}/")]
        assert allowed and all(path.endswith(".key") for path in allowed)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_side_channels_are_reachable_from_the_peer_pool_only(overlay):
    objects = render(f"overlays/{overlay}")
    deployments, policies = of_kind(objects, "Deployment"), of_kind(objects, "NetworkPolicy")
    for _, container, config in workloads(f"overlays/{overlay}"):
        if not isinstance(config, ServeConfig):
            continue
        policy = policies[f"kvxfer-{config.role.value}"]["spec"]
        peer = "decode" if config.role is Role.PREFILL else "prefill"
        reaching = [rule for rule in policy["ingress"] if _covers(rule, config.side_channel_ports, container)]
        assert reaching, "the peer pool cannot reach the side channel"
        for rule in reaching:
            sources = [_selected_component(src, deployments) for src in rule.get("from", [None])]
            assert sources == [peer], rule


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operational_settings(overlay):
    objects = render(f"overlays/{overlay}")
    pdbs = of_kind(objects, "PodDisruptionBudget").values()
    for deployment, container, config in workloads(f"overlays/{overlay}"):
        pod = deployment["spec"]["template"]["spec"]
        assert any(_selects(p["spec"]["selector"]["matchLabels"], deployment) for p in pdbs)
        drain = config.lease_s + config.transfer_deadline_s if isinstance(config, ServeConfig) else config.request_timeout_s
        assert pod["terminationGracePeriodSeconds"] > drain
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # Read-only root; /tmp is where HOME, FlashInfer's log and its lock files go (Dockerfile.cuda).
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in {v["name"]: v for v in pod["volumes"]}[tmp[0]["name"]]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_documented_flags_and_variables_exist():
    """deploy/README.md, the Dockerfiles and the scripts mention only flags and variables the CLI has."""
    known = cli_env_vars("serve") | cli_env_vars("proxy")
    for path in [DEPLOY / "README.md", *DEPLOY.glob("docker/Dockerfile.*"), *DEPLOY.glob("scripts/*")]:
        text = path.read_text()
        assert set(re.findall(r"KVXFER_[A-Z0-9_]*[A-Z0-9]", text)) <= known, path
        for command, rest in re.findall(r"kvxfer (serve|proxy)\b([^\n`]*)", text):
            flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", rest))
            assert flags <= set(parser_for(command)._option_string_actions), (path, flags)


@pytest.mark.parametrize("command", ["serve", "proxy"])
def test_the_cli_commands_take_every_config_flag(command):
    """`kvxfer serve --help` / `kvxfer proxy --help` offer what the manifests rely on."""
    pytest.importorskip(f"kvxfer.commands.{command}")
    from kvxfer.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    offered = set(sub.choices[command]._option_string_actions)
    assert set(parser_for(command)._option_string_actions) <= offered


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
def test_dockerfile_warmup_covers_the_gpu_overlay():
    cli = pytest.importorskip("kvxfer.cli")
    text = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    args = dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text, flags=re.M))
    warmup = re.search(r"kvxfer warmup .*?--cache-dir \S+", text.replace("\\\n", " ")).group(0)
    argv = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], warmup).split()[1:]
    parsed = cli.build_parser().parse_args(argv)  # the warmup command's own flags
    for _, _, config in workloads("overlays/gpu"):
        if isinstance(config, ServeConfig):
            assert config.tp in parsed.tp and config.layout in parsed.layout
            assert (config.block_size, config.dtype, config.model_dir) == (parsed.block_size, parsed.dtype, Path(parsed.model))


@pytest.mark.skipif(shutil.which("kubectl") is None or not VENV_KVXFER.exists(),
                    reason="needs kubectl and .venv/bin/kvxfer")
def test_secret_script_creates_the_keys_the_manifests_use(tmp_path):
    """Runs deploy/scripts/create-curve-secret.sh with the real `kvxfer keys generate` and the
    real `kubectl create --dry-run=client`; only `kubectl apply` is replaced, by a capture."""
    pytest.importorskip("kvxfer.commands.keys")
    kubectl, kvxfer = shutil.which("kubectl"), VENV_KVXFER
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\nif [ "$1" = apply ]; then cat > {tmp_path}/applied.yaml; else exec {kubectl} "$@"; fi\n')
    stub.chmod(0o755)
    path = f"{stub.parent}:{kvxfer.parent}:/usr/bin:/bin"
    out = subprocess.run([str(DEPLOY / "scripts" / "create-curve-secret.sh"), "demo"], env={"PATH": path},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    secret = yaml.safe_load((tmp_path / "applied.yaml").read_text())
    assert (secret["kind"], secret["metadata"]["name"], secret["metadata"]["namespace"]) == ("Secret", SECRET_NAME, "demo")
    assert set(secret["data"]) == SECRET_KEYS


def _containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _selects(selector: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def _selected(service: dict, deployments: dict[str, dict]) -> dict:
    (deployment,) = [d for d in deployments.values() if _selects(service["spec"]["selector"], d)]
    return deployment


def _selected_component(source: dict | None, deployments: dict[str, dict]) -> str:
    """The one kvxfer component a NetworkPolicy peer admits, or 'other' (namespaces, IP blocks,
    everyone)."""
    if not source or set(source) != {"podSelector"}:
        return "other"
    labels = source["podSelector"].get("matchLabels", {})
    matched = [d for d in deployments.values() if _selects(labels, d)]
    return matched[0]["metadata"]["labels"]["app.kubernetes.io/component"] if len(matched) == 1 else "other"


def _covers(rule: dict, ports: tuple[int, ...], container: dict) -> bool:
    if not rule.get("ports"):
        return True
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for entry in rule["ports"]:
        start = named.get(entry["port"], entry["port"])
        if any(start <= port <= entry.get("endPort", start) for port in ports):
            return True
    return False


def _secret_files(deployment: dict, container: dict) -> dict[str, str]:
    """{path in the container: Secret key} for every Secret volume the container mounts."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert secret["secretName"] == SECRET_NAME and "items" in secret
            files |= {f"{mount['mountPath']}/{item['path']}": item["key"] for item in secret["items"]}
    return files


# -- overlays/vllm ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmPod:
    deployment: dict
    container: dict
    flags: dict[str, str]  # `vllm serve` flags, $(VAR) expanded as Kubernetes expands them
    transfer: dict  # --kv-transfer-config

    @property
    def tp(self) -> int:
        return int(self.flags.get("--tensor-parallel-size", "1"))


def vllm_pods() -> dict[str, VllmPod]:
    """component (prefill / decode) -> its vLLM container, flags and kv-transfer-config."""
    pods = {}
    for deployment in of_kind(render(VLLM), "Deployment").values():
        (container,) = _containers(deployment)
        assert container["command"][:2] == ["vllm", "serve"], container["command"]
        flags = dict(arg.partition("=")[::2] for arg in container["args"])
        flags = {k: _expand(v, resolve_env(container)) for k, v in flags.items()}
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pods[component] = VllmPod(deployment, container, flags, json.loads(flags["--kv-transfer-config"]))
    assert set(pods) == set(VLLM_ROLES)
    return pods


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


@needs_kubectl
def test_vllm_overlay_renders_and_validates():
    objects = render(VLLM)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for role in VLLM_ROLES:
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
            assert (kind, f"kvxfer-vllm-{role}") in kinds
    assert {o["metadata"].get("namespace") for o in objects} == {"kvxfer"}
    kv = pytest.importorskip("kubernetes_validate")
    for obj in objects:
        kv.validate(obj, K8S_VERSION, strict=True)


@needs_kubectl
def test_vllm_pods_load_the_connector_with_settings_it_accepts(tmp_path):
    """Each pool's kv-transfer-config names KvxferConnector and parses with the connector's own
    parser, reading the key files exactly where the pod's Secret volumes and init container put
    them; each side trusts the other's public key, and CURVE is on."""
    from kvxfer.agents.keys import generate_keypair
    from kvxfer.integrations.vllm.config import parse_config

    pairs = {role: generate_keypair() for role in VLLM_ROLES}
    secret = {f"{r}.key": p.public.decode() for r, p in pairs.items()} | \
             {f"{r}.key_secret": p.secret.decode() for r, p in pairs.items()}
    for role, pod in vllm_pods().items():
        transfer = pod.transfer
        assert (transfer["kv_connector"], transfer["kv_role"]) == ("KvxferConnector", VLLM_ROLES[role])
        assert importlib.util.find_spec(transfer["kv_connector_module_path"]) is not None
        root = tmp_path / role
        _lay_out_pod_files(pod.deployment, secret, root)
        extra = {k: str(root) + v if k.endswith(("_file", "_dir")) else v
                 for k, v in transfer["kv_connector_extra_config"].items()}
        config = parse_config(extra, role=transfer["kv_role"], engine_id="e", default_fingerprint="f")
        assert not config.insecure and config.keys.own.public == pairs[role].public
        peer = pairs["decode" if role == "prefill" else "prefill"].public
        if role == "prefill":
            assert config.keys.allowed_client_keys == {peer}
            assert config.side_channel_host == POD_IP and config.advertise_host == POD_IP
        else:
            assert config.keys.server_public_key == peer
            assert transfer["kv_load_failure_policy"] == "recompute"


def _lay_out_pod_files(deployment: dict, secret: dict[str, str], root: Path) -> None:
    """What the pod's containers see under `root`: Secret items of the main container's volumes,
    and what the init containers' `install -m MODE SRC DST` commands copy from theirs."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}

    def mount(container: dict, into: Path) -> None:
        for m in container["volumeMounts"]:
            for item in volumes[m["name"]].get("secret", {}).get("items", []):
                path = into / m["mountPath"].lstrip("/") / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(secret[item["key"]])
                path.chmod(volumes[m["name"]]["secret"]["defaultMode"])

    for init in spec.get("initContainers", []):
        staging = root.parent / f"{root.name}-{init['name']}"
        mount(init, staging)
        program, flag, mode, src, dst = init["command"]
        assert (program, flag) == ("install", "-m")
        target = root / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / src.lstrip("/"), target)
        target.chmod(int(mode, 8))
    mount(_containers(deployment)[0], root)


@needs_kubectl
def test_vllm_ports_probes_and_gpus_agree_with_the_flags():
    pods = vllm_pods()
    services = of_kind(render(VLLM), "Service")
    for role, pod in pods.items():
        port = int(pod.flags["--port"])
        extra = pod.transfer["kv_connector_extra_config"]
        side = {f"side-{r}": extra["side_channel_port"] + r for r in range(pod.tp)} if role == "prefill" else {}
        assert {p["name"]: p["containerPort"] for p in pod.container["ports"]} == {"http": port} | side
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert pod.container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"
        assert pod.container["resources"]["limits"]["nvidia.com/gpu"] == pod.tp
        service = services[f"kvxfer-vllm-{role}"]
        assert _selects(service["spec"]["selector"], pod.deployment)
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "http")]
    for flag in ("--dtype", "--block-size"):  # otherwise the transferred KV is garbage
        assert pods["prefill"].flags[flag] == pods["decode"].flags[flag], flag
    assert pods["prefill"].container["command"] == pods["decode"].container["command"]  # the model
    assert "VLLM_KV_CACHE_LAYOUT" not in resolve_env(pods["decode"].container)  # the connector asks for HND


@needs_kubectl
def test_vllm_side_channels_are_reachable_from_the_peer_pool_only():
    objects = render(VLLM)
    deployments, policies = of_kind(objects, "Deployment"), of_kind(objects, "NetworkPolicy")
    for role, pod in vllm_pods().items():
        peer = "decode" if role == "prefill" else "prefill"
        policy = policies[f"kvxfer-vllm-{role}"]["spec"]
        extra = pod.transfer["kv_connector_extra_config"]
        ports = tuple(extra.get("side_channel_port", 5600) + r for r in range(pod.tp))
        reaching = [rule for rule in policy["ingress"] if _covers(rule, ports, pod.container)]
        assert reaching, f"the {peer} pool cannot reach {role}"
        for rule in reaching:
            assert [_selected_component(src, deployments) for src in rule.get("from", [None])] == [peer], rule


@needs_kubectl
def test_vllm_operational_settings():
    pdbs = of_kind(render(VLLM), "PodDisruptionBudget").values()
    for pod in vllm_pods().values():
        spec = pod.deployment["spec"]["template"]["spec"]
        extra = pod.transfer["kv_connector_extra_config"]
        assert any(_selects(p["spec"]["selector"]["matchLabels"], pod.deployment) for p in pdbs)
        assert spec["terminationGracePeriodSeconds"] > extra.get("lease_s", 0) + extra["transfer_deadline_s"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        for container in [pod.container, *spec["initContainers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for m in pod.container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]]
        # The secret key reaches the main container only as the init container's owner-only copy.
        for mount in pod.container["volumeMounts"]:
            keys = {i["key"] for i in volumes[mount["name"]].get("secret", {}).get("items", [])}
            assert not any(k.endswith("key_secret") for k in keys), mount
