#!/usr/bin/env bash
# Regenerates the meshed examples from their inputs with trellis-rewrite (CI runs this and fails
# if the committed files differ, so the examples never go stale).
#
#   deploy/ecs/examples/regenerate.sh [OUT_DIR]     (default: next to the inputs)
#
# TRELLIS_REWRITE: the trellis-rewrite binary (default: trellis-rewrite on PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
rewrite="${TRELLIS_REWRITE:-trellis-rewrite}"
images=(
  --envoy-image 111122223333.dkr.ecr.us-west-2.amazonaws.com/trellis-envoy:0.1.0
  --route-manager-image 111122223333.dkr.ecr.us-west-2.amazonaws.com/trellis-proxy-route-manager:0.1.0
)
# A plain task definition, meshed as virtual node `web` of mesh `shop`.
"$rewrite" --mesh shop --virtual-node web "${images[@]}" "$here/web.json" >"$out/web-meshed.json"
# An App Mesh task definition (AWS's Envoy image + proxyConfiguration), migrated to Trellis.
"$rewrite" --mesh appmesh-mesh --virtual-node colorteller-white-vn "${images[@]}" \
  "$here/appmesh-colorteller.json" >"$out/appmesh-colorteller-meshed.json"
# The same App Mesh task definition keeping AWS's Envoy image, only pointed at the agent's socket.
"$rewrite" --mesh appmesh-mesh --virtual-node colorteller-white-vn --keep-envoy-image \
  "$here/appmesh-colorteller.json" >"$out/appmesh-colorteller-stock-envoy.json"
