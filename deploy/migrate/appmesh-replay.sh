#!/usr/bin/env bash
# Replays a `--resources` file (from appmesh-export.sh) against an App Mesh API with
# `aws appmesh create-* --cli-input-json`, in the file's order (dependency order). Use it to load a
# running Trellis agent without restarting it:
#
#   AWS_ENDPOINT_URL=http://127.0.0.1:9080 deploy/migrate/appmesh-replay.sh mesh-resources.json
#
# A resource that already exists fails the run (ConflictException); `trellis-agent serve
# --resources` is the idempotent alternative. Needs the aws CLI and jq.
set -euo pipefail
file="${1:?usage: appmesh-replay.sh RESOURCES.json}"
count="$(jq 'length' "$file")"
for ((i = 0; i < count; i++)); do
  body="$(jq -c ".[$i]" "$file")"
  op="$(jq -r '
    if has("gatewayRouteName") then "create-gateway-route"
    elif has("routeName") then "create-route"
    elif has("virtualGatewayName") then "create-virtual-gateway"
    elif has("virtualRouterName") then "create-virtual-router"
    elif has("virtualNodeName") then "create-virtual-node"
    elif has("virtualServiceName") then "create-virtual-service"
    else "create-mesh" end' <<<"$body")"
  aws appmesh "$op" --cli-input-json "$body" --output json >/dev/null
  echo "appmesh-replay.sh: $op $(jq -r '[.meshName, .virtualNodeName, .virtualServiceName, .virtualRouterName, .virtualGatewayName, .routeName, .gatewayRouteName] | map(select(. != null)) | join("/")' <<<"$body")" >&2
done
