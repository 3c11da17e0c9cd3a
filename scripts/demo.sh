#!/usr/bin/env bash
# End-to-end demo on embedded defaults: starts a throwaway PostgreSQL, creates the outbox
# table, runs `outbox-relay init` and `run` with the stdout sink (config/stdout.toml), inserts
# a few rows in two transactions, prints the events, and cleans up.
#
# To try an installed or unpacked relay instead of building one:
#   OUTBOX_RELAY_BIN   the binary to run; set, nothing is built (no cargo, no build headers)
#   OUTBOX_RELAY_SHARE the directory holding config/ and migrations/ (a release tarball's top
#                      directory, /usr/share/outbox-relay for the Debian package); default: the repo
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUTBOX_RELAY_BIN:-}" ]; then
  RELAY="$OUTBOX_RELAY_BIN"
  [ -x "$RELAY" ] || { echo "OUTBOX_RELAY_BIN=$RELAY is not an executable file" >&2; exit 1; }
  # PostgreSQL only: the relay is already built.
  scripts/install-test-deps.sh --demo-runtime
else
  scripts/install-test-deps.sh --demo
  cargo build --quiet --bin outbox-relay
  RELAY="${CARGO_TARGET_DIR:-target}/debug/outbox-relay"
fi
SHARE="${OUTBOX_RELAY_SHARE:-.}"
CONFIG="$SHARE/config/stdout.toml"
MIGRATION="$SHARE/migrations/001_outbox_table.sql"
for f in "$CONFIG" "$MIGRATION"; do
  [ -r "$f" ] || { echo "$f not found (OUTBOX_RELAY_SHARE=${OUTBOX_RELAY_SHARE:-unset})" >&2; exit 1; }
done
echo "== relay: $RELAY; config and migrations from $SHARE"

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
"${PSQL[@]}" -f "$MIGRATION"
echo "== outbox-relay init"
"$RELAY" --config "$CONFIG" init
echo "== outbox-relay run (events below are its stdout; its logs go to $PGDIR/relay.log)"
"$RELAY" --config "$CONFIG" run > "$PGDIR/events.jsonl" 2> "$PGDIR/relay.log" &
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
echo "== outbox-relay status (the relay was stopped above: the verdict says the slot is inactive)"
"$RELAY" --config "$CONFIG" status || echo "(status exited $?: see docs/operations.md, status exit codes)"
echo "== 3 events from 4 inserts: the rolled-back transaction produced none."
