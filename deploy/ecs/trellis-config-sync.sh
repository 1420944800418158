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
