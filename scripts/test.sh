#!/usr/bin/env bash
# Runs every test: installs what the tests need, checks the deployment and monitoring files,
# then the whole workspace under nextest (unit tests, decoder tests on captured bytes,
# end-to-end tests against throwaway PostgreSQL clusters and real brokers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# The deployment files without a cluster (schemas, Helm, the restricted profile) and the
# alert rules, their unit tests and the dashboard's queries (promtool; this also installs the
# Prometheus the end-to-end metrics test scrapes the relay with).
scripts/check-deploy.sh
scripts/check-prometheus.sh
# The release artefacts: build the tarball and the .deb, install each here and run the demo
# from it.
scripts/package.sh
scripts/test-packages.sh
cargo nextest run --workspace --no-fail-fast "$@"
