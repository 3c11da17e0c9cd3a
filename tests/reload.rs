//! SIGHUP reloads the configuration: a configuration that loads replaces the running one
//! after a drain, with nothing lost or repeated; one that does not load is reported and the
//! relay goes on with what it has.

mod common;

use common::*;

fn insert(pg: &PgCluster, from: usize, count: usize) {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k', 'Seq', jsonb_build_object('n', n) \
         FROM generate_series({from}, {}) n",
        from + count - 1
    ));
}

/// The `n` of every event in the file sink's output at `path`.
fn seqs(path: &std::path::Path) -> Vec<u64> {
    read_events(path)
        .iter()
        .map(|event| event["data"]["n"].as_u64().unwrap())
        .collect()
}

#[test]
fn sighup_reloads_a_configuration_that_loads_and_keeps_the_running_one_otherwise() {
    let (
        Scenario {
            pg,
            config,
            events,
            dir,
        },
        mut relay,
    ) = scenario().start();
    insert(&pg, 0, 3);
    relay.delivers(&events, 3);

    // The file sink moves to another file: the relay drains, restarts with it, and the new
    // file takes the events from where the old one stopped.
    let moved = dir.join("events-after-reload.jsonl");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(&events.display().to_string(), &moved.display().to_string()),
    )
    .unwrap();
    relay.signal("-HUP");
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("SIGHUP: configuration reloaded")),
        "{}",
        relay.log()
    );
    insert(&pg, 3, 2);
    relay.delivers(&moved, 2);
    assert_eq!(seqs(&events), [0, 1, 2]);
    assert_eq!(seqs(&moved), [3, 4]);

    // A configuration that does not load changes nothing.
    std::fs::write(&config, "[source\nurl = ").unwrap();
    relay.signal("-HUP");
    assert!(
        wait_until(WAIT, || relay.log().contains(
            "SIGHUP: the configuration does not load; going on with the running one"
        )),
        "{}",
        relay.log()
    );
    insert(&pg, 5, 1);
    relay.delivers(&moved, 3);
    assert_eq!(seqs(&moved), [3, 4, 5]);
    relay.stops_cleanly();
}
