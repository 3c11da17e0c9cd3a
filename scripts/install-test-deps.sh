#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine, and nothing that is
# already there: PostgreSQL server binaries (tests start their own throwaway clusters).
# Idempotent; run as root or with sudo available.
set -euo pipefail

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${PG_BIN:-}" ]; then
  echo "installing PostgreSQL server binaries"
  apt_install postgresql postgresql-client
fi
if ! id postgres >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  useradd --system --home /var/lib/postgresql --shell /bin/sh postgres
fi
[ "${1:-}" = --postgres-only ] && exit 0

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked --quiet cargo-nextest
fi
