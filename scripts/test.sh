#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run). See --help.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'TEXT'
Usage: bash scripts/test.sh [--help]

The whole test suite, exactly what CI runs (.ci/run), as root from the repository root:
  setup    scripts/setup.sh: apt packages and the Python venv .venv (Envoy, AWS CLI, moto)
  format   cargo fmt --all -- --check
  clippy   cargo clippy --workspace --all-targets --all-features -- -D warnings
  deps     scripts/check_deps.sh: the pure crates (model, Envoy types, translation) use no I/O crate
  build    cargo build --workspace --bins
  tests    cargo test --workspace --no-fail-fast: unit tests and the end-to-end suites against
           real Envoy, the real AWS CLI, moto and iptables in network namespaces
  dynamodb the App Mesh API suites again with every agent on a DynamoDB table (moto)
  leaks    the leak check (scripts/leaks.sh): any process, network namespace, mount or
           temporary file the run left behind fails it, named

Every step runs even when an earlier one failed (tests are skipped only when the build fails), so
one run reports every failure; the summary at the end names the failed steps and the exit status
is then 1. On a 2-core VM: about 13 minutes the first time (after demo.sh's build), 7 to 11 after that.

Suites that need root (network namespaces, iptables, the container images) skip with a message
when not run as root. With CI set (CI=true, as in CI) they fail instead of skipping, and so do the
suites whose tools are missing (botocore's shape checks, buildah/skopeo/umoci).
TEXT
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) echo "test.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
esac

source scripts/leaks.sh
failed=()
started=$SECONDS
# Runs one step inside the run (its cgroup and TMPDIR), timed; a failure is recorded, not fatal.
step() {
  local name=$1 t0=$SECONDS
  shift
  echo "test.sh: == $name: $*"
  if leaks_run "$@"; then
    echo "test.sh: == $name passed ($((SECONDS - t0)) s)"
  else
    echo "test.sh: == $name FAILED ($((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}

bash scripts/setup.sh
export TRELLIS_VENV="$PWD/.venv"
export TRELLIS_BOTOCORE_PYTHON="$PWD/.venv/bin/python"
[ -n "${CI:-}" ] && export TRELLIS_REQUIRE_BOTOCORE=1

leaks_begin test.sh
# Interrupted (Ctrl-C) or failed unexpectedly: still end and remove what the run started.
trap 'leaks_end 1 || true' EXIT

step format cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
# The pure crates (model, Envoy types, translation) may not depend on I/O crates.
step deps bash scripts/check_deps.sh
step build cargo build --workspace --bins --locked
if [[ " ${failed[*]} " == *" build "* ]]; then
  echo "test.sh: tests skipped: the build failed"
else
  # Two test threads per binary, one binary at a time: the end-to-end suites share Envoy base ids
  # and CPU. --no-fail-fast: a failing suite does not hide the ones after it.
  step tests cargo test --workspace --locked --no-fail-fast -- --test-threads=2
  # The API suites once more with every agent on a DynamoDB table (its own moto server) instead of
  # the embedded store: the shared store must answer exactly as the embedded one.
  step dynamodb env TRELLIS_TEST_STORE=dynamodb cargo test -p trellis-tests --locked --no-fail-fast \
    --test appmesh_api --test appmesh_sdk -- --test-threads=2
fi

tests_failed=0
[ ${#failed[@]} -eq 0 ] || tests_failed=1
trap - EXIT
leaks_end "$tests_failed" || failed+=(leaks)

minutes=$(((SECONDS - started) / 60))
if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: FAILED after $minutes min: ${failed[*]}"
  exit 1
fi
echo "test.sh: all passed in $minutes min"
