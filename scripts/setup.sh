#!/usr/bin/env bash
# Installs what the engine and its tests need and is missing: a C toolchain, curl, the Rust
# toolchain (rustup), nats-server, Prometheus with promtool and amtool (Debian packages, for
# the deploy/ tests), and chromium with chromedriver (for the test of the page at /). Safe to
# run again.
# Sourced by quickstart.sh and test.sh.
set -euo pipefail

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
{ command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; } || missing+=(nats-server)
# prometheus and promtool: the deploy/ tests run the alert rules and dashboards against them.
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
# chromium and chromedriver: the KPI page at / is tested in a real browser.
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)   # scripts/test.sh installs nats-py and a current nats-server in a venv
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
export PATH="$HOME/.cargo/bin:/usr/sbin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
