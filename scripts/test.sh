#!/usr/bin/env bash
# The whole test suite: set up, format and lint gates, then every test (unit and end-to-end).
# Root is needed for the network-namespace suites; under CI=true they fail rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRELLIS_VENV="$PWD/.venv"
export TRELLIS_BOTOCORE_PYTHON="$PWD/.venv/bin/python"
[ -n "${CI:-}" ] && export TRELLIS_REQUIRE_BOTOCORE=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
# The pure crates (model, Envoy types, translation) may not depend on I/O crates.
bash scripts/check_deps.sh
cargo build --workspace --bins --locked
# One test binary at a time: the end-to-end suites share port 9901 inside their own namespaces,
# but Envoy base ids and CPU are shared.
cargo test --workspace --locked -- --test-threads=2
# The API suites once more with every agent on a DynamoDB table (its own moto server) instead of the
# embedded store: the shared store must answer exactly as the embedded one.
TRELLIS_TEST_STORE=dynamodb cargo test -p trellis-tests --locked --test appmesh_api --test appmesh_sdk \
  -- --test-threads=2
