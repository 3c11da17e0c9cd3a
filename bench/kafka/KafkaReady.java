// Why this file exists: bench/run.py starts an Apache Kafka broker for the Kafka sinks and must
// not measure anything before the broker can serve them. The port opens before the group
// coordinator is up (until it is, reading committed offsets, as the relay's Kafka sink does in
// its recovery, fails with NotCoordinator), so the harness runs this probe with Java's
// source-file launcher and the broker's own kafka-clients jar:
//   java -cp '.kafka-broker/lib/*' bench/kafka/KafkaReady.java HOST:PORT TIMEOUT_MS
// It asks for a consumer group's committed offsets; the admin client retries until the
// coordinator answers or the timeout passes (exit status 1).
import java.util.Map;

import org.apache.kafka.clients.admin.Admin;

public final class KafkaReady {
    public static void main(String[] args) throws Exception {
        String timeout = args[1];
        try (Admin admin = Admin.create(Map.of(
                "bootstrap.servers", args[0],
                "default.api.timeout.ms", timeout,
                "request.timeout.ms", timeout))) {
            admin.listConsumerGroupOffsets("readiness").partitionsToOffsetAndMetadata().get();
        } catch (Exception e) {
            System.err.println("Kafka is not ready: " + e);
            System.exit(1);
        }
    }
}
