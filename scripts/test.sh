#!/usr/bin/env bash
# Sets rbee up if needed, then runs the whole test suite (unit tests and the
# integration tests against real nats-server, hive and worker processes).
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
# nats-py, for the Python example's test (kept in .cache, not installed system-wide).
pylib="$root/.cache/pylib"
if ! PYTHONPATH="$pylib" python3 -c "import nats" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$pylib" nats-py==2.16.0
fi
export RBEE_TEST_PYTHONPATH="$pylib"
cargo test --release --workspace "$@"
