#!/usr/bin/env bash
# End-to-end demo on embedded defaults: starts a throwaway PostgreSQL, creates the outbox
# table, runs `outbox-relay init` and `run` with the stdout sink (config/stdout.toml), inserts
# a few rows in two transactions, prints the events, and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh --demo
cargo build --quiet --bin outbox-relay
RELAY="${CARGO_TARGET_DIR:-target}/debug/outbox-relay"

read -r PGDIR URL < <(scripts/pg-throwaway.sh)
RELAY_PID=
cleanup() {
  [ -n "$RELAY_PID" ] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null || true
  scripts/pg-throwaway.sh stop "$PGDIR"
}
trap cleanup EXIT
export OUTBOX_RELAY__SOURCE__URL="$URL"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -d "$URL")

echo "== PostgreSQL at $URL"
"${PSQL[@]}" -f migrations/001_outbox_table.sql
echo "== outbox-relay init"
"$RELAY" --config config/stdout.toml init
echo "== outbox-relay run (events below are its stdout; its logs go to $PGDIR/relay.log)"
"$RELAY" --config config/stdout.toml run > "$PGDIR/events.jsonl" 2> "$PGDIR/relay.log" &
RELAY_PID=$!
"${PSQL[@]}" <<'SQL'
BEGIN;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES
  ('order', 'order-1', 'OrderCreated', '{"customer": "ada", "total": 42.5}'),
  ('order', 'order-1', 'OrderPaid', '{"method": "card"}');
COMMIT;
BEGIN;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES
  ('customer', 'ada', 'CustomerUpgraded', '{"tier": "gold"}');
ROLLBACK;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES
  ('order', 'order-2', 'OrderCreated', '{"customer": "grace", "total": 7}');
SQL
for _ in $(seq 1 100); do
  [ "$(wc -l < "$PGDIR/events.jsonl")" -ge 3 ] && break
  sleep 0.1
done
cat "$PGDIR/events.jsonl"
kill -TERM "$RELAY_PID"; wait "$RELAY_PID"; RELAY_PID=
echo "== outbox-relay status"
"$RELAY" --config config/stdout.toml status
echo "== 3 events from 4 inserts: the rolled-back transaction produced none."
