#!/bin/sh
# Create the compose stack's secrets once (existing files are kept): a client API key, the key the
# gateway presents to the engine, and Grafana's admin password, each a random 32-byte hex string.
#   sh deploy/make-secrets.sh [DIR]        (DIR defaults to deploy/secrets; SPECSERVE_SECRETS_DIR)
# The directory is private to you (0700); the files are readable inside the containers, which run
# as other users (0644 within that directory).
set -eu
dir="${1:-${SPECSERVE_SECRETS_DIR:-$(dirname "$0")/secrets}}"
mkdir -p "$dir"
chmod 0700 "$dir"
for name in api-keys engine-api-key grafana-admin-password; do
  if [ ! -s "$dir/$name" ]; then
    python3 -c 'import secrets; print(secrets.token_hex(32))' > "$dir/$name"
    chmod 0644 "$dir/$name"
    echo "created $dir/$name" >&2
  fi
done
echo "client key: $(head -n 1 "$dir/api-keys")"
