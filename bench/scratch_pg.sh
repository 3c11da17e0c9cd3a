# Sourced by the by-hand benchmark scripts (bench/upcast.sh, bench/rabbitmq_channels.sh,
# bench/shards.sh): a throwaway PostgreSQL cluster with wal_level = logical in $WORK on port
# $P, the relay binary in $BIN, `$PSQL -c SQL`, and `stop_scratch_pg`. Run as root with
# PostgreSQL 15 installed (initdb runs as the postgres user).
set -e
WORK=${WORK:-/tmp/outbox-relay-bench-$$}
mkdir -p "$WORK" && chown postgres: "$WORK"
BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/outbox-relay}
P=${PGPORT_SCRATCH:-55437}
D=$WORK/pg
rm -rf "$D"
runuser -u postgres -- initdb -D "$D" -U postgres >/dev/null 2>&1
printf "wal_level=logical\nport=%s\nunix_socket_directories='%s'\nmax_wal_senders=20\nmax_replication_slots=20\n" \
  "$P" "$WORK" >> "$D/postgresql.conf"
runuser -u postgres -- pg_ctl -D "$D" -l "$WORK/pg.log" start >/dev/null
PSQL="psql -h $WORK -p $P -U postgres -qAt"
stop_scratch_pg() { runuser -u postgres -- pg_ctl -D "$D" stop >/dev/null; }
