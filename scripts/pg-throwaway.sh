#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster configured for logical replication, for the demo and
# for manual experiments. Prints the connection URL; `scripts/pg-throwaway.sh stop DIR` stops
# and removes it. Uses the server binaries installed on the machine (PG_BIN overrides).
set -euo pipefail

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$dir" ]; then echo "$dir"; return; fi
  if command -v pg_config >/dev/null; then pg_config --bindir; return; fi
  echo "PostgreSQL server binaries not found: run scripts/install-test-deps.sh or set PG_BIN" >&2
  exit 1
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN=$(pg_bin)
if [ "${1:-}" = stop ]; then
  as_postgres "$BIN/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null || true
  rm -rf "$2"
  exit 0
fi

DIR=$(mktemp -d /tmp/outbox-relay-pg.XXXXXX)
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_postgres "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --locale=C -N >/dev/null
cat >> "$DIR/data/postgresql.auto.conf" <<CONF
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
CONF
as_postgres "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
echo "$DIR postgres://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
