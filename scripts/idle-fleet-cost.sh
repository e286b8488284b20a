#!/usr/bin/env bash
# What an idle fleet costs: starts a nats-server and N hives (no models, no
# workers) on this machine, lets them settle for 15 s, then prints the CPU
# time the broker and the hives used over the next 30 s. Give several hive
# binaries to compare builds side by side in one run:
#   scripts/idle-fleet-cost.sh 24 target/release/rbee-hive /tmp/old/rbee-hive
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:?usage: idle-fleet-cost.sh N HIVE_BIN...}"
shift
[ $# -gt 0 ] || set -- "$root/target/release/rbee-hive"
tick=$(getconf CLK_TCK)
cpu_ms() { awk -v t="$tick" '{ print int(($14 + $15) * 1000 / t) }' "/proc/$1/stat"; }
for hive_bin in "$@"; do
  dir=$(mktemp -d)
  mkdir -p "$dir/nats/ports"
  GOMAXPROCS="${GOMAXPROCS:-1}" nats-server -c "$root/broker-config/nats-server.conf" -js -sd "$dir/nats" \
    -a 127.0.0.1 -p -1 --ports_file_dir "$dir/nats/ports" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 100); do ls "$dir"/nats/ports/*.ports >/dev/null 2>&1 && break; sleep 0.05; done
  port=$(sed -E 's/.*:([0-9]+)".*/\1/' "$dir"/nats/ports/*.ports)
  hives=()
  for i in $(seq "$n"); do
    mkdir -p "$dir/h$i"
    RBEE_HOME="$dir/h$i" "$hive_bin" --nats-url "nats://127.0.0.1:$port" --hive-id "idle-$i" \
      --models-dir "$dir/models" --worker-bin /bin/false >/dev/null 2>&1 &
    hives+=($!)
  done
  sleep 15
  s0=$(cpu_ms "$server"); h0=0; for p in "${hives[@]}"; do h0=$((h0 + $(cpu_ms "$p"))); done
  sleep 30
  s1=$(cpu_ms "$server"); h1=0; for p in "${hives[@]}"; do h1=$((h1 + $(cpu_ms "$p"))); done
  printf '%s, %d idle hives, 30 s: nats-server %d ms CPU (%.1f %% of a core), hives %d ms CPU in all\n' \
    "$hive_bin" "$n" $((s1 - s0)) "$(awk -v ms=$((s1 - s0)) 'BEGIN { print ms / 300 }')" $((h1 - h0))
  kill "${hives[@]}" 2>/dev/null || true
  wait "${hives[@]}" 2>/dev/null || true
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$dir"
done
