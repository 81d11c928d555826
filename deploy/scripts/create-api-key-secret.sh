#!/bin/sh
# Create (or rotate) the Secret `kvxfer-api-keys` that turns API keys on (docs/security.md):
#   client-keys  the keys clients send to the proxy (`Authorization: Bearer KEY`), comma-separated
#   backend-key  the key the proxy presents to the prefill and decode services (only it holds it)
#
#   deploy/scripts/create-api-key-secret.sh [NAMESPACE] [CLIENT_KEYS]    (default: kvxfer, a fresh key)
#
# Rotation without downtime: run it with CLIENT_KEYS="OLD,NEW", restart the proxy, move clients
# to NEW, then run it with CLIENT_KEYS="NEW". The backend key is made fresh each time: restart
# both pools and the proxy together (`kubectl rollout restart deployment -n NS -l app.kubernetes.io/name=kvxfer`).
# The keys print nowhere; read a client key back with
#   kubectl get secret kvxfer-api-keys -n NS -o jsonpath='{.data.client-keys}' | base64 -d
set -eu
namespace=${1:-kvxfer}
fresh() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
client_keys=${2:-$(fresh)}
backend_key=$(fresh)
kubectl create secret generic kvxfer-api-keys --namespace "$namespace" \
  --from-literal=client-keys="$client_keys" --from-literal=backend-key="$backend_key" \
  --dry-run=client --output=yaml | kubectl apply --filename=-
echo "secret/kvxfer-api-keys in namespace $namespace holds the client keys and a fresh backend key"
