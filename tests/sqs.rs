//! The SQS and SNS sinks end to end: PostgreSQL → relay → moto's SQS and SNS (installed in
//! .venv-brokers by scripts/install-test-deps.sh), read back with the AWS SDK. An SNS topic
//! is read through an SQS queue subscribed to it with raw message delivery. Each test
//! starts its own moto server and PostgreSQL cluster.

mod common;

use common::aws::{Aws, Moto, Received, AWS_ENV};
use common::aws_proxy;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the tests read of a dead letter: "sink | reason".
const LETTER: &str = "sink, reason";

/// A `[sinks.NAME]` table of `kind` (`sqs` or `sns`) sending to `destination` (a queue URL
/// or topic ARN) at `endpoint`, with more keys in `extra`.
fn aws_sink(name: &str, kind: &str, destination: &str, endpoint: &str, extra: &str) -> String {
    let key = if kind == "sqs" {
        "queue_url"
    } else {
        "topic_arn"
    };
    format!(
        "[sinks.{name}]\ntype = \"{kind}\"\n{key} = \"{destination}\"\nendpoint_url = \"{endpoint}\"\n{extra}\n"
    )
}

/// A scenario on the outbox with headers whose sinks are `sinks`.
fn relay_to(sinks: &str) -> ScenarioBuilder {
    scenario().outbox_sql(OUTBOX_WITH_HEADERS).sinks(sinks)
}

/// Reads `queue` until `count` distinct events arrived, then once more (a copy arriving
/// late would show); returns every message in arrival order.
fn read_all(aws: &Aws, queue: &str, count: usize, relay: &Relay) -> Vec<Received> {
    let mut messages = Vec::new();
    let arrived = wait_until(WAIT, || {
        aws.receive_messages(queue, &mut messages);
        distinct(&messages) >= count
    });
    assert!(
        arrived,
        "{} of {count} events arrived; relay log:\n{}",
        distinct(&messages),
        relay.log()
    );
    aws.receive_messages(queue, &mut messages);
    messages
}

fn distinct(messages: &[Received]) -> usize {
    messages
        .iter()
        .map(|m| m.attributes["id"].clone())
        .collect::<HashSet<_>>()
        .len()
}

fn bodies(messages: &[Received]) -> Vec<Value> {
    messages.iter().map(|m| m.body.clone()).collect()
}

/// Guarantee: on a FIFO queue each event arrives once, in per-key order, as its CloudEvents
/// envelope with the attributes consumers filter on; its group id is its key.
#[test]
fn a_fifo_queue_gets_each_event_once_in_key_order_grouped_by_key() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let queue = aws.queue(&unique("orders"), true);
    let (Scenario { pg, .. }, relay) =
        relay_to(&aws_sink("q", "sqs", &queue, &moto.url(), "")).start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 40);
    let messages = read_all(&aws, &queue, 200, &relay);
    assert_once_in_order(&bodies(&messages), 200);
    for message in &messages {
        let body = &message.body;
        assert_eq!(message.attributes["id"], body["id"]);
        assert_eq!(message.attributes["type"], "Seq");
        assert_eq!(message.attributes["aggregatetype"], "order");
        assert_eq!(message.attributes["aggregateid"], body["subject"]);
        assert_eq!(message.attributes["sequence"], body["sequence"]);
        assert_eq!(
            message.group.as_ref(),
            body["subject"].as_str().map(str::to_owned).as_ref()
        );
        assert_eq!(body["tenant"], "acme", "headers travel in the envelope");
    }
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: a FIFO queue drops a second copy of an event (same deduplication id, the
/// event id) within its deduplication interval; a standard queue keeps both, each with the
/// event id in its `id` attribute. Two sinks send every event to the same queue, as a relay
/// resending after a crash would.
#[test]
fn a_fifo_queue_drops_a_resend_a_standard_queue_keeps_it_with_the_event_id() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let fifo = aws.queue(&unique("fifo"), true);
    let standard = aws.queue(&unique("standard"), false);
    let sinks = [
        aws_sink("fifo_a", "sqs", &fifo, &moto.url(), ""),
        aws_sink("fifo_b", "sqs", &fifo, &moto.url(), ""),
        aws_sink("std_a", "sqs", &standard, &moto.url(), "format = \"raw\""),
        aws_sink("std_b", "sqs", &standard, &moto.url(), "format = \"raw\""),
    ]
    .concat();
    let (Scenario { pg, .. }, relay) = relay_to(&sinks).start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 10);
    let mut copies = Vec::new();
    assert!(
        wait_until(WAIT, || {
            aws.receive_messages(&standard, &mut copies);
            copies.len() >= 100
        }),
        "{} of 100 copies; relay log:\n{}",
        copies.len(),
        relay.log()
    );
    assert_eq!(distinct(&copies), 50, "two copies of each event, same id");
    assert!(
        copies.iter().all(|m| m.body.get("n").is_some()),
        "raw payloads"
    );
    // A clean stop drains every sink: both FIFO sinks have sent every event, and the queue
    // holds one copy of each.
    let mut relay = relay;
    relay.stops_cleanly();
    let messages = read_all(&aws, &fifo, 50, &relay);
    assert_once_in_order(&bodies(&messages), 50);
}

/// Guarantee: an SNS FIFO topic gets each event once, in per-key order, with the same
/// attributes (subscription filter policies can use them) and group ids.
#[test]
fn an_sns_fifo_topic_gets_each_event_once_in_key_order() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let (topic, queue) = aws.topic_into_queue(&unique("orders"), true);
    let (standard_topic, standard_queue) = aws.topic_into_queue(&unique("plain"), false);
    let sinks = [
        aws_sink("topic", "sns", &topic, &moto.url(), ""),
        aws_sink("plain", "sns", &standard_topic, &moto.url(), ""),
    ]
    .concat();
    let (Scenario { pg, .. }, relay) = relay_to(&sinks).start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 20);
    let messages = read_all(&aws, &queue, 100, &relay);
    assert_once_in_order(&bodies(&messages), 100);
    for message in &messages {
        assert_eq!(message.attributes["id"], message.body["id"]);
        assert_eq!(message.attributes["aggregateid"], message.body["subject"]);
    }
    let plain = read_all(&aws, &standard_queue, 100, &relay);
    assert_eq!(distinct(&plain), 100);
}

/// Guarantee: a message over the service's limit (SNS 256 KiB, or a smaller
/// `max_request_bytes`) is dead-lettered with the reason before
/// sending; the events around it are delivered in order.
#[test]
fn an_oversized_event_is_dead_lettered_and_the_stream_goes_on() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let (topic, queue) = aws.topic_into_queue(&unique("big"), true);
    let (Scenario { pg, .. }, relay) =
        relay_to(&aws_sink("topic", "sns", &topic, &moto.url(), "")).start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 1);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'k0', 'Huge', jsonb_build_object('blob', repeat('x', 300000)))",
    );
    insert_numbered(&pg, "order", 5, 1);
    let messages = read_all(&aws, &queue, 10, &relay);
    assert_once_in_order(&bodies(&messages), 10);
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("topic |") && letters[0].contains("over the limit of 262144 bytes"),
        "{letters:?}"
    );
}

/// Guarantee: a queue that does not exist is a clear error: `check` names it with the fix,
/// and `run` stops with it instead of dead-lettering events; once the queue exists every
/// event is delivered. `check` also reports a queue taking smaller messages than the sink
/// may send.
#[test]
fn a_missing_queue_is_reported_by_check_and_stops_run() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let name = unique("missing");
    let url = format!("{}/123456789012/{name}.fifo", moto.url());
    let Scenario { pg, config, .. } = relay_to(&aws_sink("q", "sqs", &url, &moto.url(), "")).init();
    let out = relay_command_with_env(&config, "check", &AWS_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("sink q: queue {url} does not exist"))
            && stdout.contains("--attributes FifoQueue=true"),
        "{stdout}"
    );

    let mut relay = Relay::start_with_env(&config, &AWS_ENV);
    insert_numbered(&pg, "order", 0, 1);
    let log = relay.stops_with_failure(WAIT, "the relay should stop");
    assert!(
        log.contains(&format!(
            "queue {url} does not exist in this account and region"
        )),
        "{log}"
    );

    let queue = aws.queue(&name, true);
    assert_eq!(queue, url, "moto's queue URL is the one configured");
    assert!(relay_command_with_env(&config, "check", &AWS_ENV)
        .status
        .success());
    let relay = Relay::start_with_env(&config, &AWS_ENV);
    let messages = read_all(&aws, &queue, 5, &relay);
    assert_once_in_order(&bodies(&messages), 5);

    aws.rt.block_on(async {
        aws.sqs
            .set_queue_attributes()
            .queue_url(&queue)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
                "2048",
            )
            .send()
            .await
            .unwrap()
    });
    let out = relay_command_with_env(&config, "check", &AWS_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("takes messages up to 2048 bytes")
            && stdout.contains("max_request_bytes = 2048"),
        "{stdout}"
    );
}

/// Guarantee: SQS unreachable mid-stream (the emulator stopped with SIGSTOP for 10 s:
/// requests time out) delays delivery but loses nothing; the FIFO queue's deduplication
/// drops the copies of requests that timed out but were processed, so each event is there
/// once, in per-key order.
#[test]
fn an_outage_delays_but_loses_and_repeats_nothing_on_a_fifo_queue() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let queue = aws.queue(&unique("outage"), true);
    let (Scenario { pg, .. }, relay) = relay_to(&aws_sink(
        "q",
        "sqs",
        &queue,
        &moto.url(),
        "timeout = \"1s\"",
    ))
    .start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 4);
    let mut messages = read_all(&aws, &queue, 20, &relay);
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &moto.pid().to_string()])
            .status()
            .unwrap()
    };
    signal("-STOP");
    let stopped = std::time::Instant::now();
    insert_numbered(&pg, "order", 20, 4);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("SendMessageBatch failed; retrying")),
        "the relay should retry while SQS is down:\n{}",
        relay.log()
    );
    std::thread::sleep(std::time::Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    signal("-CONT");
    messages.extend(read_all(&aws, &queue, 20, &relay));
    assert_once_in_order(&bodies(&messages), 40);
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// The example config/sqs.toml works as documented, with the database URL, the queue URL,
/// the credentials and the endpoint from the environment.
#[test]
fn the_example_config_works_with_settings_from_the_environment() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let queue = aws.queue(&unique("orders"), true);
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "sqs.toml");
    let (url, moto_url) = (pg.url(), moto.url());
    let mut env = AWS_ENV.to_vec();
    env.extend([
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("OUTBOX_RELAY__SINKS__ORDERS__QUEUE_URL", queue.as_str()),
        ("AWS_ENDPOINT_URL", moto_url.as_str()),
    ]);
    init_and_check(&config, &env);
    let relay = Relay::start_with_env(&config, &env);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'OrderCreated', '{\"n\": 1}')");
    let messages = read_all(&aws, &queue, 1, &relay);
    assert_eq!(messages[0].body["data"]["n"], 1);
    assert_eq!(messages[0].group.as_deref(), Some("o-1"));
}

/// SQS's protocol: JSON 1.0.
const JSON_1_0: &str = "application/x-amz-json-1.0";

/// Answers `SendMessageBatch` requests in part: of the first `partial` requests of several
/// entries only every other entry reaches moto, the rest fail with `InternalError` (a
/// service fault); an entry whose body names the type `Poison` fails with
/// `InvalidMessageContents` (a sender fault). Everything else goes to moto.
async fn send_in_part(
    head: String,
    body: Vec<u8>,
    upstream: u16,
    partial: &AtomicUsize,
) -> Vec<u8> {
    if aws_proxy::target(&head) != "AmazonSQS.SendMessageBatch" {
        return aws_proxy::forward_whole(&head, &body, upstream).await;
    }
    let mut request: Value = serde_json::from_slice(&body).unwrap();
    let entries = request["Entries"].as_array().unwrap().clone();
    let split = entries.len() >= 2
        && partial
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let mut failed = Vec::new();
    let mut forwarded = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let id = entry["Id"].clone();
        if entry["MessageBody"]
            .as_str()
            .unwrap()
            .contains("\"type\":\"Poison\"")
        {
            failed.push(
                json!({"Id": id, "SenderFault": true, "Code": "InvalidMessageContents",
                "Message": "injected"}),
            );
        } else if split && i % 2 == 1 {
            failed.push(
                json!({"Id": id, "SenderFault": false, "Code": "InternalError",
                "Message": "injected"}),
            );
        } else {
            forwarded.push(entry);
        }
    }
    let mut successful = Vec::new();
    if !forwarded.is_empty() {
        request["Entries"] = Value::Array(forwarded);
        let body = serde_json::to_vec(&request).unwrap();
        let (_, answer) = aws_proxy::forward(&head, &body, upstream).await;
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        successful = answer["Successful"].as_array().cloned().unwrap_or_default();
        failed.extend(answer["Failed"].as_array().cloned().unwrap_or_default());
    }
    aws_proxy::json_response(
        JSON_1_0,
        "200 OK",
        &json!({"Successful": successful, "Failed": failed}),
    )
}

/// Guarantee: entries SQS refuses for now (a service fault) are retried alone, without
/// loss, repeats or reordering of a FIFO queue's keys; an entry refused for its content (a
/// sender fault) is dead-lettered with SQS's code, and the stream goes on.
#[test]
fn entries_refused_in_part_are_retried_or_dead_lettered_by_their_fault() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let queue = aws.queue(&unique("partial"), true);
    let partial = Arc::new(AtomicUsize::new(2));
    let counter = partial.clone();
    let proxy = aws_proxy::start(&aws.rt, moto.port, move |head, body, upstream| {
        let counter = counter.clone();
        async move { send_in_part(head, body, upstream, &counter).await }
    });
    let (Scenario { pg, .. }, relay) =
        relay_to(&aws_sink("q", "sqs", &queue, &proxy, "")).start_with_env(&AWS_ENV);
    insert_numbered(&pg, "order", 0, 10);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'k1', 'Poison', '{}')",
    );
    insert_numbered(&pg, "order", 50, 2);
    let messages = read_all(&aws, &queue, 60, &relay);
    assert_once_in_order(&bodies(&messages), 60);
    assert_eq!(
        partial.load(Ordering::SeqCst),
        0,
        "the proxy refused nothing in part"
    );
    assert!(
        relay
            .log()
            .contains("SendMessageBatch refused some entries for now"),
        "{}",
        relay.log()
    );
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("q | SQS refused the message: InvalidMessageContents"),
        "{letters:?}"
    );
}
