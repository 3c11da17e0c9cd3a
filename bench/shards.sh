#!/bin/bash
# Key-sharded slots by hand: ROWS outbox rows (100 per transaction, 1,000 keys), null sink,
# drained by one relay (source.shards = 1) and by two (shards = 2, one relay per shard, at
# once), over TCP and over the Unix socket. Time: start to every slot confirmed past the
# last commit. Run as root on a machine with PostgreSQL 15 (initdb via runuser).
. "$(dirname "$0")/scratch_pg.sh"
ROWS=${ROWS:-200000}
$PSQL -c "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL)"
config() { # name url shards shard
cat > $WORK/$1.toml <<TOML
[source]
url = "$2"
slot = "$1"
publication = "$1"
tables = ["public.outbox"]
shards = $3
shard = $4
[log]
level = "warn"
[sinks.n]
type = "null"
TOML
$BIN --config $WORK/$1.toml init >/dev/null
}
TCP="postgres://postgres@127.0.0.1:$P/postgres"
for t in tcp unix; do
  url=$TCP; [ $t = unix ] && url="host=$WORK port=$P user=postgres dbname=postgres"
  config one_$t "$url" 1 0
  config two_$t "$url" 2 0
  config two_$t "$url" 2 1
done
$PSQL -c "DO \$\$ BEGIN FOR tx IN 0..($ROWS / 100 - 1) LOOP INSERT INTO outbox (aggregatetype, aggregateid, type, payload) SELECT 'order', 'k' || ((tx * 100 + n) % 1000), 'Seq', jsonb_build_object('n', n, 'pad', repeat('x', 200)) FROM generate_series(1, 100) n; COMMIT; END LOOP; END \$\$"
END=$($PSQL -c "SELECT pg_current_wal_lsn()")
walsender_cpu() { $PSQL -c "SELECT string_agg(active_pid::text, ' ') FROM pg_replication_slots WHERE slot_name LIKE '$1%'"; }
for t in tcp unix; do
  for run in one two; do
    start=$(date +%s.%N)
    pids=""
    if [ $run = one ]; then shards="0"; else shards="0 1"; fi
    for i in $shards; do
      RUST_LOG=warn OUTBOX_RELAY__SOURCE__SHARD=$i $BIN --config $WORK/${run}_$t.toml run 2>>$WORK/${run}_$t.log &
      pids="$pids $!"
    done
    while [ "$($PSQL -c "SELECT bool_and(confirmed_flush_lsn >= '$END') FROM pg_replication_slots WHERE slot_name LIKE '${run}_$t%'")" != t ]; do sleep 0.02; done
    end=$(date +%s.%N)
    relay_cpu=0; for p in $pids; do relay_cpu=$(echo "$relay_cpu + $(awk '{print ($14+$15)/100}' /proc/$p/stat)" | bc); done
    ws_cpu=0; for p in $(walsender_cpu ${run}_$t); do ws_cpu=$(echo "$ws_cpu + $(awk '{print ($14+$15)/100}' /proc/$p/stat)" | bc); done
    kill $pids; wait $pids 2>/dev/null || true
    secs=$(echo "$end - $start" | bc)
    echo "$t, $run shard(s): $secs s, $(echo "$ROWS / $secs" | bc) events/s, relay CPU $relay_cpu s, walsender CPU $ws_cpu s"
  done
done
stop_scratch_pg
