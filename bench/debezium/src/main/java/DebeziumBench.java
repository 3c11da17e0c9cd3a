// Why this file exists: bench/run.py's debezium phase measures Debezium's embedded engine on
// the same WAL as the relay. This driver runs the engine on a slot the harness created before
// the workload, counts what reaches the consumer, and prints machine-readable lines the harness
// parses (wall-clock times in microseconds since the epoch):
//   engine <class>                 the engine implementation DebeziumEngine.create picked
//   sample <text>                  the first record, abridged (to check what was measured)
//   first <micros>                 the first record reached the consumer
//   half <micros> <count>          the consumer has seen at least half of the expected records
//   done <micros> <count>          it has seen them all (kafka: every one acknowledged by the broker)
// After `done` it keeps running until the harness, having read its CPU and memory, stops it.
//
// Usage: DebeziumBench plain|outbox|kafka EXPECTED_RECORDS ENGINE_PROPERTIES_FILE
//   plain   Connect records (no serialization) into a consumer that counts them
//   outbox  the same, with the EventRouter transform configured in the properties file
//   kafka   EventRouter, JSON converter, an idempotent Kafka producer (bench.kafka.* properties);
//           a batch counts once the producer has flushed it
import java.io.FileReader;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.connect.source.SourceRecord;

import io.debezium.embedded.Connect;
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.Header;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import io.debezium.engine.format.Json;
import io.debezium.engine.format.KeyValueHeaderChangeEventFormat;

public final class DebeziumBench {
    private final long expected;
    private long seen;
    private boolean halfSaid;

    private DebeziumBench(long expected) {
        this.expected = expected;
    }

    private static long micros() {
        Instant now = Instant.now();
        return now.getEpochSecond() * 1_000_000L + now.getNano() / 1_000;
    }

    private static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    private void sample(Object topic, Object key, Object value, Object headers) {
        if (seen == 0) {
            String text = "topic=" + topic + " key=" + key + " headers=" + headers + " value=" + value;
            say("sample " + text.substring(0, Math.min(text.length(), 400)).replace('\n', ' '));
        }
    }

    /** Called by the consumer thread after each batch is through. */
    private void counted(int records) {
        if (records == 0) {
            return;
        }
        if (seen == 0) {
            say("first " + micros());
        }
        seen += records;
        if (!halfSaid && seen * 2 >= expected) {
            halfSaid = true;
            say("half " + micros() + " " + seen);
        }
        if (seen >= expected && seen - records < expected) {
            say("done " + micros() + " " + seen);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: DebeziumBench plain|outbox|kafka EXPECTED_RECORDS PROPERTIES_FILE");
            System.exit(2);
        }
        String mode = args[0];
        DebeziumBench bench = new DebeziumBench(Long.parseLong(args[1]));
        Properties props = new Properties();
        try (Reader reader = new FileReader(args[2], StandardCharsets.UTF_8)) {
            props.load(reader);
        }
        AtomicReference<Throwable> failure = new AtomicReference<>();
        DebeziumEngine.CompletionCallback completion = (success, message, error) -> {
            if (!success) {
                System.err.println("engine stopped: " + message);
                if (error != null) {
                    error.printStackTrace();
                }
                failure.set(error != null ? error : new IllegalStateException(message));
            }
        };
        DebeziumEngine<?> engine = switch (mode) {
            case "plain", "outbox" -> DebeziumEngine.create(ChangeEventFormat.of(Connect.class))
                    .using(props)
                    .using(completion)
                    .notifying(bench::countConnect)
                    .build();
            case "kafka" -> bench.kafkaEngine(props, completion);
            default -> throw new IllegalArgumentException("unknown mode " + mode);
        };
        say("engine " + engine.getClass().getName());
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        executor.shutdown();
        while (!executor.awaitTermination(1, TimeUnit.SECONDS)) {
            if (failure.get() != null) {
                break;
            }
        }
        System.exit(failure.get() == null ? 0 : 1);
    }

    private void countConnect(List<RecordChangeEvent<SourceRecord>> records,
                              DebeziumEngine.RecordCommitter<RecordChangeEvent<SourceRecord>> committer)
            throws InterruptedException {
        if (!records.isEmpty()) {
            SourceRecord first = records.get(0).record();
            sample(first.topic(), first.key(), first.value(), first.headers());
        }
        for (RecordChangeEvent<SourceRecord> record : records) {
            committer.markProcessed(record);
        }
        committer.markBatchFinished();
        counted(records.size());
    }

    private DebeziumEngine<ChangeEvent<String, String>> kafkaEngine(
            Properties props, DebeziumEngine.CompletionCallback completion) throws Exception {
        String bootstrap = props.getProperty("bench.kafka.bootstrap");
        String topic = props.getProperty("bench.kafka.topic");
        int partitions = Integer.parseInt(props.getProperty("bench.kafka.partitions", "3"));
        // Like the relay's Kafka sink with create_topics: the topic exists before the first send.
        try (Admin admin = Admin.create(Map.of("bootstrap.servers", bootstrap))) {
            admin.createTopics(Set.of(new NewTopic(topic, partitions, (short) 1))).all().get();
        }
        Properties producerProps = new Properties();
        producerProps.put("bootstrap.servers", bootstrap);
        producerProps.put("enable.idempotence", "true");
        producerProps.put("acks", "all");
        producerProps.put("linger.ms", props.getProperty("bench.kafka.linger.ms", "2"));
        KafkaProducer<String, String> producer =
                new KafkaProducer<>(producerProps, new StringSerializer(), new StringSerializer());
        AtomicReference<Exception> sendError = new AtomicReference<>();
        return DebeziumEngine.create(KeyValueHeaderChangeEventFormat.of(Json.class, Json.class, Json.class))
                .using(props)
                .using(completion)
                .notifying((List<ChangeEvent<String, String>> records,
                            DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer) -> {
                    if (!records.isEmpty()) {
                        ChangeEvent<String, String> first = records.get(0);
                        sample(topic, first.key(), first.value(), first.headers().stream()
                                .map(h -> ((Header<?>) h).getKey() + ":" + ((Header<?>) h).getValue()).toList());
                    }
                    for (ChangeEvent<String, String> event : records) {
                        ProducerRecord<String, String> record =
                                new ProducerRecord<>(topic, event.key(), event.value());
                        List<Header<String>> headers = event.headers();
                        for (Header<String> header : headers) {
                            String value = header.getValue();
                            record.headers().add(header.getKey(),
                                    value == null ? null : value.getBytes(StandardCharsets.UTF_8));
                        }
                        producer.send(record, (metadata, error) -> {
                            if (error != null) {
                                sendError.compareAndSet(null, error);
                            }
                        });
                    }
                    // Debezium Server's Kafka sink also waits for the batch's acknowledgements
                    // before it marks the batch processed.
                    producer.flush();
                    if (sendError.get() != null) {
                        throw new IllegalStateException("Kafka send failed", sendError.get());
                    }
                    for (ChangeEvent<String, String> event : records) {
                        committer.markProcessed(event);
                    }
                    committer.markBatchFinished();
                    counted(records.size());
                })
                .build();
    }
}
