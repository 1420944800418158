#!/usr/bin/env bash
# The main job: a live two-task mesh on the embedded store, printing what happens. Root needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRELLIS_VENV="$PWD/.venv"
cargo build --workspace --bins --locked --quiet
exec cargo run --quiet --locked -p trellis-tests --bin trellis-demo
