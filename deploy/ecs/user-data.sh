#!/bin/bash
# EC2 user data for an ECS container instance that runs the Trellis agent daemon.
# The agent runs as uid/gid 1338 (not root): its socket, data and audit log directories on the
# host must be its own before the daemon task starts (Docker would create missing host paths as
# root). Its API configuration (auth file, TLS certificate and key, in /etc/trellis) comes from SSM
# Parameter Store through trellis-config-sync (deploy/ecs/trellis-config-sync.sh, copied below;
# CI checks the copy), now and every five minutes.
set -euo pipefail
install -d -o 1338 -g 1338 -m 0755 /var/run/trellis /var/lib/trellis
install -d -o 1338 -g 1338 -m 0750 /var/log/trellis
# /var/run is a tmpfs: recreate the socket directory on every boot.
cat >/etc/tmpfiles.d/trellis.conf <<'CONF'
d /run/trellis 0755 1338 1338 -
CONF

install -m 0755 /dev/stdin /usr/local/sbin/trellis-config-sync <<'SYNC'
#!/bin/bash
# Keeps the agent's API configuration on a container instance in step with SSM Parameter Store:
# the auth file (/trellis/api-auth) and the API's TLS certificate and key (/trellis/api-tls-cert,
# /trellis/api-tls-key, SecureString). The agent reloads each file when it changes, so granting a
# role or rotating the certificate is an `aws ssm put-parameter`, on every instance within the
# timer's period. A parameter that cannot be read leaves the current file in place.
# Needs the AWS CLI and an instance role allowed ssm:GetParameter on parameter/trellis/* (and
# kms:Decrypt for a customer-managed key). TRELLIS_CONFIG_DIR overrides /etc/trellis.
set -euo pipefail
dir=${TRELLIS_CONFIG_DIR:-/etc/trellis}
fetch() { # PARAMETER DEST MODE
  local tmp
  tmp=$(mktemp "$(dirname "$2")/.sync.XXXXXX")
  if aws ssm get-parameter --with-decryption --name "$1" --query Parameter.Value --output text >"$tmp" && [ -s "$tmp" ]; then
    chown root:1338 "$tmp"
    chmod "$3" "$tmp"
    if cmp -s "$tmp" "$2"; then rm -f "$tmp"; else mv -f "$tmp" "$2"; fi
  else
    rm -f "$tmp"
    echo "trellis-config-sync: cannot read $1; keeping $2" >&2
  fi
}
install -d -o root -g 1338 -m 0750 "$dir" "$dir/tls"
# The key before the certificate: the agent keeps the old pair until both match.
fetch /trellis/api-tls-key "$dir/tls/api.key" 0640
fetch /trellis/api-tls-cert "$dir/tls/api.pem" 0644
fetch /trellis/api-auth "$dir/api-auth.json" 0640
SYNC
/usr/local/sbin/trellis-config-sync
cat >/etc/systemd/system/trellis-config-sync.service <<'UNIT'
[Unit]
Description=Sync the Trellis agent's API configuration from SSM Parameter Store
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/trellis-config-sync
UNIT
cat >/etc/systemd/system/trellis-config-sync.timer <<'UNIT'
[Unit]
Description=Sync the Trellis agent's API configuration every five minutes
[Timer]
OnBootSec=1min
OnUnitActiveSec=5min
[Install]
WantedBy=timers.target
UNIT
systemctl daemon-reload
systemctl enable --now trellis-config-sync.timer

echo "ECS_CLUSTER=default" >>/etc/ecs/ecs.config
