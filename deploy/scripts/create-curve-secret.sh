#!/bin/sh
# Create (or rotate) the Secret `kvxfer-curve-keys` that authenticates the side channels:
# one CURVE key pair per pool, made by `kvxfer keys generate`. The keys exist on disk only in a
# temporary directory that is removed on exit.
#
#   deploy/scripts/create-curve-secret.sh [NAMESPACE]    (default: kvxfer)
#
# Keys in the Secret: prefill.key, prefill.key_secret, decode.key, decode.key_secret.
# A prefill pod gets prefill.key_secret (its identity) and decode.key (the only client it allows,
# and the server it pushes to); a decode pod the mirror image. Pods read keys at start: after a
# rotation, restart both pools (`kubectl rollout restart deployment -n NS -l app.kubernetes.io/name=kvxfer`).
set -eu
namespace=${1:-kvxfer}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kvxfer keys generate --out "$dir" --name prefill > /dev/null
kvxfer keys generate --out "$dir" --name decode > /dev/null
kubectl create secret generic kvxfer-curve-keys --namespace "$namespace" \
  --from-file="$dir/prefill.key" --from-file="$dir/prefill.key_secret" \
  --from-file="$dir/decode.key" --from-file="$dir/decode.key_secret" \
  --dry-run=client --output=yaml | kubectl apply --filename=-
echo "secret/kvxfer-curve-keys in namespace $namespace holds fresh prefill and decode key pairs"
