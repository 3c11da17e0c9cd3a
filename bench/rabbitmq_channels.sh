#!/bin/bash
# RabbitMQ exchange sink, channels 1/2/4/8, into 4 classic queues behind a consistent-hash
# exchange (routing key = aggregate id): 100k events, 1000 keys, drain time. Needs the local
# RabbitMQ with rabbitmq_consistent_hash_exchange enabled, and rabbitmqadmin.
. "$(dirname "$0")/scratch_pg.sh"
Q=${QUEUES:-4}
$PSQL -c "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL)"
rabbitmqadmin -q delete exchange name=bench-hash >/dev/null 2>&1 || true
rabbitmqadmin -q declare exchange name=bench-hash type=x-consistent-hash durable=true
for q in $(seq 1 $Q); do
  rabbitmqadmin -q delete queue name=bench-q$q >/dev/null 2>&1 || true
  rabbitmqadmin -q declare queue name=bench-q$q durable=true
  rabbitmqadmin -q declare binding source=bench-hash destination=bench-q$q routing_key=1
done
for ch in ${CHANNELS:-1 2 4 8}; do
cat > $WORK/ch$ch.toml <<TOML
[source]
url = "postgres://postgres@localhost:$P/postgres"
slot = "rmq_$ch"
tables = ["public.outbox"]
[relay]
batch_size = ${BATCH:-1000}
[log]
level = "warn"
[sinks.r]
type = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange = "bench-hash"
routing_key = "{aggregateid}"
channels = $ch
TOML
$BIN --config $WORK/ch$ch.toml init >/dev/null
done
$PSQL -c "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) SELECT 'order', 'o-' || (n % 1000), 'OrderPlaced', jsonb_build_object('n', n, 'note', repeat('x', 200)) FROM generate_series(1, 100000) n"
END=$($PSQL -c "SELECT pg_current_wal_lsn()")
for ch in ${CHANNELS:-1 2 4 8}; do
  start=$(date +%s.%N)
  $BIN --config $WORK/ch$ch.toml run 2>$WORK/ch$ch.log &
  pid=$!
  while [ "$($PSQL -c "SELECT confirmed_flush_lsn >= '$END' FROM pg_replication_slots WHERE slot_name='rmq_$ch'")" != t ]; do sleep 0.02; done
  end=$(date +%s.%N)
  cpu=$(awk '{print ($14+$15)/100}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null || true
  secs=$(echo "$end - $start" | bc)
  echo "channels $ch, $Q queues: $secs s, $(echo "100000 / $secs" | bc) events/s, relay cpu $cpu s"
  for q in $(seq 1 $Q); do rabbitmqadmin -q purge queue name=bench-q$q; done
done
stop_scratch_pg
