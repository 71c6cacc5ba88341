#!/usr/bin/env bash
# Runs the load benchmark against a private nats-server and writes BENCHMARKS.md.
# Takes 15-20 minutes on a 2-core machine; arguments go to kpi-bench (see --help), e.g.
#   scripts/bench.sh --events 200000 --large-events 0     # a quick run
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release -q -p kpi -p kpi-bench
NATS_BIN="$(command -v nats-server || echo /usr/sbin/nats-server)"
# The section scripts/bench-cluster.sh writes is kept (it comes last).
cluster_section="$(sed -n '/^## Multi-engine mode$/,$p' BENCHMARKS.md 2>/dev/null || true)"
target/release/kpi-bench --engine target/release/kpi --nats-server "$NATS_BIN" --out BENCHMARKS.md "$@"
cat scripts/bench-notes.md >> BENCHMARKS.md
if [ -n "$cluster_section" ]; then printf '\n%s\n' "$cluster_section" >> BENCHMARKS.md; fi
echo "wrote BENCHMARKS.md"
