#!/usr/bin/env bash
# Captures real pgoutput (proto_version 1) messages from a throwaway PostgreSQL 15
# cluster into src/source/testdata/pgoutput-v1.hex, one hex-encoded message per line.
# The decoder tests in src/source/pgoutput.rs assert on exactly the statements below,
# so change both together. Re-running is safe: LSNs, xids, timestamps and OIDs change,
# nothing the tests assert on does.
#
# Usage: scripts/capture-pgoutput.sh            (PG_BIN overrides the server's bin dir)
set -euo pipefail

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo_root/src/source/testdata/pgoutput-v1.hex"

if [[ ! -x "$PG_BIN/initdb" ]]; then
    echo "capture-pgoutput: no initdb in $PG_BIN (install postgresql-15 or set PG_BIN)" >&2
    exit 1
fi

# initdb refuses to run as root, so run the server tools as `postgres` when we are root.
as_pg() {
    if [[ "$(id -u)" -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tmp="$(mktemp -d -t pgoutput-capture.XXXXXX)"
data="$tmp/data"
started=0
cleanup() {
    if [[ "$started" -eq 1 ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
if [[ "$(id -u)" -eq 0 ]]; then
    chown postgres: "$tmp"
fi

port=""
for _ in $(seq 1 50); do
    candidate=$((20000 + RANDOM % 40000))
    if ! port_in_use "$candidate"; then
        port="$candidate"
        break
    fi
done
if [[ -z "$port" ]]; then
    echo "capture-pgoutput: no free port found" >&2
    exit 1
fi

as_pg "$PG_BIN/initdb" -D "$data" -N -A trust -E UTF8 --locale=C -U postgres >/dev/null
cat >>"$data/postgresql.conf" <<EOF
wal_level = logical
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$tmp'
fsync = off
max_replication_slots = 4
max_wal_senders = 4
EOF
as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
started=1

psql_pg() {
    as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$tmp" -p "$port" -U postgres -d postgres "$@"
}

psql_pg <<'SQL'
CREATE TYPE outbox_status AS ENUM ('pending', 'published');
CREATE TABLE outbox(
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL
);
CREATE PUBLICATION pub FOR TABLE outbox;
SELECT pg_create_logical_replication_slot('s', 'pgoutput') \g /dev/null

-- 1. a single insert
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000001', 'order', 'o-1', 'OrderCreated', '{"total": 42}');

-- 2. a multi-row transaction
BEGIN;
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000002', 'order', 'o-2', 'OrderCreated', '{"total": 7}');
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000003', 'order', 'o-3', 'OrderCreated', '{"total": 8}');
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000004', 'customer', 'c-1', 'CustomerRegistered', '{}');
COMMIT;

-- 3. an update under REPLICA IDENTITY FULL (old tuple 'O'), then a delete under the
--    default identity (key tuple 'K'); each ALTER makes pgoutput resend the Relation
ALTER TABLE outbox REPLICA IDENTITY FULL;
UPDATE outbox SET type = 'OrderPaid' WHERE id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE outbox REPLICA IDENTITY DEFAULT;
DELETE FROM outbox WHERE id = '00000000-0000-0000-0000-000000000002';

-- 4. truncate
TRUNCATE outbox RESTART IDENTITY;

-- 5. a transactional and a non-transactional logical decoding message
SELECT pg_logical_emit_message(true, 'outbox', '{"kind":"transactional"}') \g /dev/null
SELECT pg_logical_emit_message(false, 'outbox', '{"kind":"non-transactional"}') \g /dev/null

-- 6. a schema change mid-stream, then a row using the new column, then one leaving it NULL
ALTER TABLE outbox ADD COLUMN trace_id text;
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000005', 'order', 'o-5', 'OrderCreated', '{"total": 5}', 'trace-5');
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000006', 'order', 'o-6', 'OrderCreated', '{"total": 6}', NULL);

-- 7. a payload large and incompressible enough to be stored out of line (TOAST), then an
--    update that does not touch it: pgoutput sends it as 'u' (unchanged toast)
INSERT INTO outbox
SELECT '00000000-0000-0000-0000-000000000007', 'blob', 'b-7', 'BlobStored',
       jsonb_build_object('blob', string_agg(md5(i::text), '' ORDER BY i)), NULL
FROM generate_series(1, 100) AS i;
UPDATE outbox SET type = 'BlobTouched' WHERE id = '00000000-0000-0000-0000-000000000007';

-- 8. a column of a user-defined enum type: pgoutput sends a Type message before the Relation
ALTER TABLE outbox ADD COLUMN status outbox_status;
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000008', 'order', 'o-8', 'OrderCreated', '{"total": 8}', NULL, 'pending');

-- 9. a transaction replayed from another node carries an Origin message after Begin
SELECT pg_replication_origin_create('upstream') \g /dev/null
SELECT pg_replication_origin_session_setup('upstream') \g /dev/null
BEGIN;
SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-01 00:00:00+00') \g /dev/null
INSERT INTO outbox VALUES
    ('00000000-0000-0000-0000-000000000009', 'order', 'o-9', 'OrderReplicated', '{}', NULL, 'published');
COMMIT;
SELECT pg_replication_origin_session_reset() \g /dev/null
SQL

mkdir -p "$(dirname "$out")"
psql_pg -A -t -c "SELECT encode(data, 'hex') FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')" >"$out.tmp"
mv "$out.tmp" "$out"
echo "capture-pgoutput: wrote $(wc -l <"$out") messages to $out"
