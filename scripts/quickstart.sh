#!/usr/bin/env bash
# Quick start: installs what is missing, starts a private nats-server with JetStream and the
# engine, loads a six-year demo history, and shows where to look. Ctrl-C stops everything.
# Data lives in ./var (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

NATS_PORT="${KPI_DEMO_NATS_PORT:-4223}"   # not 4222: leave any system NATS alone
HTTP="${KPI_DEMO_HTTP:-127.0.0.1:9464}"
export KPI__NATS__URL="nats://127.0.0.1:${NATS_PORT}" KPI__HTTP__LISTEN="$HTTP"

echo "building kpi (release; the first build takes a few minutes)..."
cargo build --release -q -p kpi
KPI=target/release/kpi
mkdir -p var/nats

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

NATS_BIN="$(command -v nats-server || echo /usr/sbin/nats-server)"
"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd var/nats -l var/nats.log &
pids+=($!)
"$KPI" serve --config config/demo.toml 2> var/engine.log &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fs "http://$HTTP/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://$HTTP/readyz" >/dev/null || { echo "the engine did not become ready; see var/engine.log"; tail -20 var/engine.log; exit 1; }

# The tenant is configured, so the API answers even for an empty store: look for leads.
if curl -fs "http://$HTTP/api/v1/kpis?tenant=default&period=all" 2>/dev/null | grep -Eq '"leads":[1-9]'; then
  echo "the demo history is already loaded (delete ./var to start over)"
else
  "$KPI" demo --config config/demo.toml
  sleep 2
fi
"$KPI" report --config config/demo.toml --trend month --last 12
echo
"$KPI" report --config config/demo.toml --retention --last 6
cat <<INFO

The engine is running with the demo history (logs: var/engine.log).
  In a browser:     http://$HTTP/   (the five KPIs, their history, retention, channels, campaigns)
  KPIs per month:   curl 'http://$HTTP/api/v1/kpis?tenant=default&period=$(date +%Y-%m)'
  36 months:        curl 'http://$HTTP/api/v1/kpis/series?tenant=default&granularity=month&from=$(date -d '-35 months' +%Y-%m 2>/dev/null || date +%Y-01)&to=$(date +%Y-%m)'
  Retention:        curl 'http://$HTTP/api/v1/retention/series?tenant=default&from=$(( $(date +%Y) - 5 ))&to=$(date +%Y)'
  The API:          http://$HTTP/api/v1/openapi.json   (OpenAPI 3.1)
  Prometheus:       curl http://$HTTP/metrics
  Terminal report:  $KPI report --config config/demo.toml --period $(date +%Y) [--csv]
  Your own events:  $KPI publish --config config/demo.toml events.jsonl   (NATS at $KPI__NATS__URL)
Ctrl-C stops the engine and nats-server.
INFO
wait
