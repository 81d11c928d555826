"""The manifests' API-key wiring: every kvxfer container takes its keys from the Secret
`kvxfer-api-keys` with the CLI's own variables, the key the proxy presents is the one the services
accept, and deploy/scripts/create-api-key-secret.sh makes exactly that Secret."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
import yaml
from test_deploy import (
    API_KEY_SECRET,
    DEPLOY,
    OVERLAYS,
    needs_kubectl,
    parser_for,
    resolve_env,
    workloads,
)

from kvxfer.daemons.auth import api_keys_from_args, backend_key_from_args

CLIENT_KEYS, BACKEND_KEY = "client-old-0123456789,client-new-0123456789", "backend-0123456789abcdef"


def keys_of(container: dict, api_keys: dict[str, str] | None):
    command, *argv = container["args"]
    args = parser_for(command).parse_args(argv)
    env = resolve_env(container, api_keys=api_keys)
    return api_keys_from_args(args, env), (backend_key_from_args(args, env) if command == "proxy" else None)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keys_come_from_the_secret_and_the_proxy_holds_the_services_key(overlay):
    secret = {"client-keys": CLIENT_KEYS, "backend-key": BACKEND_KEY}
    for deployment, container, _ in workloads(f"overlays/{overlay}"):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == API_KEY_SECRET}
        assert all(ref["optional"] is True for ref in refs.values())
        accepted, presented = keys_of(container, secret)
        if container["args"][0] == "proxy":
            assert set(refs) == {"KVXFER_API_KEY", "KVXFER_BACKEND_API_KEY"}
            assert accepted.allows("Bearer client-new-0123456789") and accepted.allows("Bearer client-old-0123456789")
            assert not accepted.allows(f"Bearer {BACKEND_KEY}") and presented == BACKEND_KEY
        else:
            assert set(refs) == {"KVXFER_API_KEY"}, deployment["metadata"]["name"]
            assert accepted.allows(f"Bearer {BACKEND_KEY}") and not accepted.allows("Bearer client-new-0123456789")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_without_the_secret_the_api_is_open(overlay):
    for _, container, _ in workloads(f"overlays/{overlay}"):
        accepted, presented = keys_of(container, None)
        assert not accepted.enabled and presented is None


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
def test_secret_script_makes_the_keys_the_manifests_use(tmp_path):
    """The real `kubectl create --dry-run=client`; only `kubectl apply` is a capture."""
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\nif [ "$1" = apply ]; then cat > {tmp_path}/applied.yaml; '
                    f'else exec {shutil.which("kubectl")} "$@"; fi\n')
    stub.chmod(0o755)
    out = subprocess.run([str(DEPLOY / "scripts" / "create-api-key-secret.sh"), "demo", CLIENT_KEYS],
                         env={"PATH": f"{stub.parent}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    secret = yaml.safe_load((tmp_path / "applied.yaml").read_text())
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (API_KEY_SECRET, "demo")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["client-keys"] == CLIENT_KEYS and len(data["backend-key"]) == 64
    assert CLIENT_KEYS not in out.stdout and data["backend-key"] not in out.stdout
