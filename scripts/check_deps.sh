#!/usr/bin/env bash
# The pure crates stay pure: the App Mesh model, the Envoy message types, the translation and its
# explanation (`trellis-agent explain`) may not depend (even indirectly) on anything that does I/O.
# Translation's purity is what lets the xDS layer version resources by content hash and lets
# `explain` run it offline; this makes it a fact Cargo checks rather than a sentence in
# ARCHITECTURE.md. Exits 1 naming each crate and the path
# that brought it in.
set -euo pipefail
cd "$(dirname "$0")/.."

pure=(trellis-model trellis-envoy-api trellis-translate trellis-explain)
# Runtimes, network stacks, gRPC transport, AWS SDKs, and envoy-types (which brings tonic's transport).
forbidden='^(tokio|tokio-[a-z-]+|mio|socket2|aws-[a-z-]+|tonic|tonic-[a-z-]+|hyper|hyper-[a-z-]+|h2|axum|axum-[a-z-]+|tower|tower-[a-z-]+|reqwest|envoy-types) '

failed=0
for crate in "${pure[@]}"; do
  tree=$(cargo tree --locked -e normal -p "$crate" --prefix none --format '{p}')
  found=$(sort -u <<<"$tree" | grep -E "$forbidden" || true)
  if [ -n "$found" ]; then
    failed=1
    echo "check_deps: $crate must not depend on I/O crates, but its normal dependencies include:" >&2
    while read -r dep; do
      name=${dep%% *}
      echo "  $dep, through:" >&2
      cargo tree --locked -e normal -p "$crate" -i "$name" --prefix indent 2>/dev/null | sed 's/^/      /' | head -8 >&2
    done <<<"$found"
  fi
done
if [ "$failed" = 0 ]; then
  echo "check_deps: ${pure[*]} are free of I/O crates"
fi
exit "$failed"
