#!/bin/bash
# Upcast throughput by hand: 100k OrderPlaced v1 events, null sink, as stored vs upcast to latest.
. "$(dirname "$0")/scratch_pg.sh"
$PSQL -c "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, schema_version int)"
for mode in stored latest; do
cat > $WORK/$mode.toml <<TOML
[source]
url = "postgres://postgres@localhost:$P/postgres"
slot = "s_$mode"
tables = ["public.outbox"]
[upcast.OrderPlaced.1]
to = 2
program = '{totalAmount: .amount, currency: "USD", items: []} + del(.amount)'
[upcast.OrderPlaced.2]
to = 3
program = '. + {channel: "web"}'
[log]
level = "warn"
[sinks.n]
type = "null"
TOML
[ $mode = latest ] && echo 'upcast = { to = "latest" }' >> $WORK/$mode.toml
$BIN --config $WORK/$mode.toml init >/dev/null
done
$PSQL -c "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) SELECT 'order', 'o-' || (n % 1000), 'OrderPlaced', jsonb_build_object('amount', n, 'note', repeat('x', 200)), 1 FROM generate_series(1, 100000) n"
END=$($PSQL -c "SELECT pg_current_wal_lsn()")
for mode in stored latest; do
  start=$(date +%s.%N)
  $BIN --config $WORK/$mode.toml run 2>$WORK/$mode.log &
  pid=$!
  while [ "$($PSQL -c "SELECT confirmed_flush_lsn >= '$END' FROM pg_replication_slots WHERE slot_name='s_$mode'")" != t ]; do sleep 0.02; done
  end=$(date +%s.%N)
  cpu=$(awk '{print ($14+$15)/100}' /proc/$pid/stat)
  kids=$(pgrep -P $pid | head -1); kcpu=0; [ -n "$kids" ] && kcpu=$(awk '{print ($14+$15)/100}' /proc/$kids/stat)
  kill $pid; wait $pid 2>/dev/null || true
  echo "$mode: $(echo "$end - $start" | bc) s, relay cpu $cpu s, helper cpu $kcpu s"
done
stop_scratch_pg
