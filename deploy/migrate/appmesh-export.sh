#!/usr/bin/env bash
# Exports App Mesh meshes through the AWS CLI (list-* and describe-*, plus list-tags-for-resource)
# as one Trellis `--resources` file on stdout: a JSON list of create-request bodies, in dependency
# order, that `trellis-agent serve --resources FILE` imports (or appmesh-replay.sh replays).
#
#   deploy/migrate/appmesh-export.sh [MESH...] > mesh-resources.json
#
# No MESH: every mesh the account can list. The endpoint, region and credentials are the AWS
# CLI's usual ones (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...). Needs the aws CLI and jq.
# Read-only: it only calls list-*, describe-* and list-tags-for-resource.
set -euo pipefail
for tool in aws jq; do
  command -v "$tool" >/dev/null || { echo "appmesh-export.sh: $tool is not installed" >&2; exit 1; }
done
am() { aws appmesh "$@" --output json; }

# One create-request body: the describe output's resource minus what App Mesh computes
# (metadata, status), with the resource's tags.
item() { # RESOURCE_JSON
  local arn tags
  arn="$(jq -r '.metadata.arn' <<<"$1")"
  tags="$(am list-tags-for-resource --resource-arn "$arn" | jq '.tags')"
  jq --argjson tags "$tags" 'del(.metadata, .status) | if ($tags | length) > 0 then . + {tags: $tags} else . end' <<<"$1"
}

meshes=("$@")
if [ ${#meshes[@]} -eq 0 ]; then
  mapfile -t meshes < <(am list-meshes | jq -r '.meshes[].meshName')
fi

{
  for mesh in "${meshes[@]}"; do
    item "$(am describe-mesh --mesh-name "$mesh" | jq '.mesh')"
    for n in $(am list-virtual-nodes --mesh-name "$mesh" | jq -r '.virtualNodes[].virtualNodeName'); do
      item "$(am describe-virtual-node --mesh-name "$mesh" --virtual-node-name "$n" | jq '.virtualNode')"
    done
    for r in $(am list-virtual-routers --mesh-name "$mesh" | jq -r '.virtualRouters[].virtualRouterName'); do
      item "$(am describe-virtual-router --mesh-name "$mesh" --virtual-router-name "$r" | jq '.virtualRouter')"
    done
    for g in $(am list-virtual-gateways --mesh-name "$mesh" | jq -r '.virtualGateways[].virtualGatewayName'); do
      item "$(am describe-virtual-gateway --mesh-name "$mesh" --virtual-gateway-name "$g" | jq '.virtualGateway')"
    done
    for s in $(am list-virtual-services --mesh-name "$mesh" | jq -r '.virtualServices[].virtualServiceName'); do
      item "$(am describe-virtual-service --mesh-name "$mesh" --virtual-service-name "$s" | jq '.virtualService')"
    done
    for r in $(am list-virtual-routers --mesh-name "$mesh" | jq -r '.virtualRouters[].virtualRouterName'); do
      for rt in $(am list-routes --mesh-name "$mesh" --virtual-router-name "$r" | jq -r '.routes[].routeName'); do
        item "$(am describe-route --mesh-name "$mesh" --virtual-router-name "$r" --route-name "$rt" | jq '.route')"
      done
    done
    for g in $(am list-virtual-gateways --mesh-name "$mesh" | jq -r '.virtualGateways[].virtualGatewayName'); do
      for gr in $(am list-gateway-routes --mesh-name "$mesh" --virtual-gateway-name "$g" | jq -r '.gatewayRoutes[].gatewayRouteName'); do
        item "$(am describe-gateway-route --mesh-name "$mesh" --virtual-gateway-name "$g" --gateway-route-name "$gr" | jq '.gatewayRoute')"
      done
    done
  done
} | jq -s '.'
