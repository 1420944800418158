#!/bin/bash
# EC2 user data for an ECS container instance that runs the Trellis agent daemon.
# The agent runs as uid/gid 1338 (not root): its socket and data directories on the host must be
# its own before the daemon task starts (Docker would create missing host paths as root).
set -euo pipefail
install -d -o 1338 -g 1338 -m 0755 /var/run/trellis /var/lib/trellis
# /var/run is a tmpfs: recreate the socket directory on every boot.
cat >/etc/tmpfiles.d/trellis.conf <<'CONF'
d /run/trellis 0755 1338 1338 -
CONF
echo "ECS_CLUSTER=default" >>/etc/ecs/ecs.config
