#!/usr/bin/env bash
# Runs every test: installs what the tests need, then the whole workspace under nextest
# (unit tests, decoder tests on captured bytes, end-to-end tests against throwaway
# PostgreSQL clusters).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo nextest run --workspace --no-fail-fast "$@"
