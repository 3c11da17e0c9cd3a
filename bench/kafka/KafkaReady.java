// Why this file exists: bench/run.py starts an Apache Kafka broker for the Kafka sinks and must
// not measure anything before the broker can serve them. The port opens before the group
// coordinator is up (until it is, reading committed offsets, as the relay's Kafka sink does in
// its recovery, fails with NotCoordinator), so the harness runs this probe with Java's
// source-file launcher and the broker's own kafka-clients jar:
//   java -cp '.kafka-broker/lib/*' bench/kafka/KafkaReady.java HOST:PORT TIMEOUT_MS WARM_RECORDS
// It asks for a consumer group's committed offsets; the admin client retries until the
// coordinator answers or the timeout passes (exit status 1). Then it warms the broker up: a
// fresh broker JVM runs its produce and transaction paths interpreted for its first seconds
// (the first Kafka run of a phase was several times slower than the next on the same broker),
// and a production broker is warm. It produces WARM_RECORDS records with an idempotent
// producer and as many again in transactions of 100 records, into a topic of its own.
import java.util.Map;
import java.util.Properties;
import java.util.Set;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;

public final class KafkaReady {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String timeout = args[1];
        int warm = Integer.parseInt(args[2]);
        try (Admin admin = Admin.create(Map.of(
                "bootstrap.servers", bootstrap,
                "default.api.timeout.ms", timeout,
                "request.timeout.ms", timeout))) {
            admin.listConsumerGroupOffsets("readiness").partitionsToOffsetAndMetadata().get();
            if (warm > 0) {
                admin.createTopics(Set.of(new NewTopic("bench-warm-up", 3, (short) 1))).all().get();
            }
        } catch (Exception e) {
            System.err.println("Kafka is not ready: " + e);
            System.exit(1);
        }
        if (warm == 0) {
            return;
        }
        String body = "x".repeat(600);
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        props.put("enable.idempotence", "true");
        props.put("linger.ms", "2");
        try (KafkaProducer<String, String> producer =
                     new KafkaProducer<>(props, new StringSerializer(), new StringSerializer())) {
            for (int i = 0; i < warm; i++) {
                producer.send(new ProducerRecord<>("bench-warm-up", "key-" + i % 1000, body));
            }
            producer.flush();
        }
        props.put("transactional.id", "bench-warm-up");
        try (KafkaProducer<String, String> producer =
                     new KafkaProducer<>(props, new StringSerializer(), new StringSerializer())) {
            producer.initTransactions();
            for (int i = 0; i < warm; i += 100) {
                producer.beginTransaction();
                for (int j = i; j < Math.min(i + 100, warm); j++) {
                    producer.send(new ProducerRecord<>("bench-warm-up", "key-" + j % 1000, body));
                }
                producer.commitTransaction();
            }
        }
    }
}
