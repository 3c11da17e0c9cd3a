//! The mapper's unit tests: one table shape and row at a time, no database.

use super::layout::{BYTEA_OID, JSONB_OID};
use super::*;
use crate::config::AdditionalColumn;
use crate::row::Column;
use bytes::Bytes;
use outbox_relay_sinks::Lsn;
use std::collections::BTreeMap;

const TEXT: u32 = 25;
const UUID_OID: u32 = 2950;
const INT: u32 = 23;
const TIMESTAMPTZ: u32 = 1184;
const ID: &str = "6f1d6a0e-8f6b-4c1e-9a51-2f0c6b1d9e11";
const CTX: RowContext = RowContext {
    position: Position {
        commit_lsn: Lsn(100),
        index: 3,
    },
    xid: 9,
    commit_time_micros: 0,
};
const DEBEZIUM: [(&str, u32); 5] = [
    ("id", UUID_OID),
    ("aggregatetype", TEXT),
    ("aggregateid", TEXT),
    ("type", TEXT),
    ("payload", JSONB_OID),
];

fn relation(name: &str, columns: &[(&str, u32)]) -> Table {
    Table {
        id: 7,
        schema: "public".into(),
        name: name.into(),
        columns: columns
            .iter()
            .map(|(name, type_oid)| Column {
                name: (*name).into(),
                type_oid: *type_oid,
            })
            .collect(),
    }
}

/// Maps one row of `public.outbox` with `mapping` and the given column values.
fn map_with(
    mapping: Option<TableMapping>,
    columns: &[(&str, u32)],
    values: &[Option<&str>],
) -> Mapped {
    let mappings: BTreeMap<String, TableMapping> = mapping
        .into_iter()
        .map(|m| ("public.outbox".to_owned(), m))
        .collect();
    let mut mapper = OutboxMapper::new(&["public.outbox".into()], &mappings, &[]);
    mapper.on_relation(relation("outbox", columns));
    let data = Bytes::from(values.iter().flatten().copied().collect::<String>());
    let mut offset = 0;
    let values: Vec<Value> = values
        .iter()
        .map(|v| match v {
            Some(s) => {
                let slice = &data[offset..offset + s.len()];
                offset += s.len();
                Value::Text(slice)
            }
            None => Value::Null,
        })
        .collect();
    let row = Row {
        values: &values,
        frame: &data,
    };
    mapper.map_insert(7, row, CTX).unwrap()
}

fn event(mapped: Mapped) -> Event {
    match mapped {
        Mapped::Event(e) => *e,
        Mapped::DeadLetter(d) => panic!("dead letter: {}", d.reason),
        Mapped::NotOutbox => panic!("not outbox"),
        Mapped::NullPayloadSkipped(_) => panic!("skipped"),
    }
}

#[test]
fn a_bytea_payload_is_its_decoded_bytes_with_the_mappings_content_type() {
    let mut bytea = DEBEZIUM;
    bytea[4] = ("payload", BYTEA_OID);
    let row = |payload| {
        [
            Some(ID),
            Some("order"),
            Some("o-1"),
            Some("T"),
            Some(payload),
        ]
    };
    let e = event(map_with(None, &bytea, &row("\\x00ff0a7b")));
    assert_eq!(
        e.payload,
        Payload::Binary {
            bytes: Bytes::from_static(&[0x00, 0xff, 0x0a, 0x7b]),
            content_type: "application/octet-stream".into(),
        }
    );
    let letter = DeadLetter::from_event(&e, "refused by the sink", "refused".into(), None);
    assert_eq!(letter.row["payload"], "\\x00ff0a7b");
    let avro: TableMapping =
        serde_json::from_value(serde_json::json!({ "content_type": "application/avro" })).unwrap();
    let e = event(map_with(Some(avro), &bytea, &row("\\x")));
    assert_eq!(e.payload.content_type(), "application/avro");
    assert!(e.payload.is_empty());
    for malformed in ["00ff", "\\x0", "\\xzz", "\\000"] {
        let Mapped::DeadLetter(letter) = map_with(None, &bytea, &row(malformed)) else {
            panic!("{malformed:?} is not hex bytea");
        };
        assert!(
            letter.reason.contains("not in hex form"),
            "{}",
            letter.reason
        );
    }
}

#[test]
fn a_null_payload_follows_the_tables_policy() {
    let row = [Some(ID), Some("order"), Some("o-1"), Some("T"), None];
    let with = |policy: &str| {
        let mapping: TableMapping =
            serde_json::from_value(serde_json::json!({ "on_null_payload": policy })).unwrap();
        map_with(Some(mapping), &DEBEZIUM, &row)
    };
    let Mapped::DeadLetter(letter) = map_with(None, &DEBEZIUM, &row) else {
        panic!("the default is a dead letter");
    };
    assert_eq!(letter.reason, "column \"payload\" is NULL");
    assert!(matches!(with("dead-letter"), Mapped::DeadLetter(_)));
    let Mapped::NullPayloadSkipped(table) = with("skip") else {
        panic!("skip is no event and no dead letter");
    };
    assert_eq!(&*table, "public.outbox");
    let tombstone = event(with("tombstone"));
    assert_eq!(tombstone.payload, Payload::Tombstone);
    assert_eq!((&*tombstone.key, &*tombstone.id), ("o-1", ID));
    let Mapped::DeadLetter(letter) = map_with(
        Some(
            serde_json::from_value(serde_json::json!({ "on_null_payload": "tombstone" })).unwrap(),
        ),
        &DEBEZIUM,
        &[Some(ID), Some("order"), None, Some("T"), None],
    ) else {
        panic!("a tombstone still needs its key");
    };
    assert_eq!(letter.reason, "column \"aggregateid\" is NULL");
}

#[test]
fn maps_the_debezium_layout_in_any_column_order() {
    let mut reordered = DEBEZIUM;
    reordered.reverse();
    let e = event(map_with(
        None,
        &reordered,
        &[
            Some("{}"),
            Some("Created"),
            Some("o-1"),
            Some("order"),
            Some(ID),
        ],
    ));
    assert_eq!(
        (
            &*e.id,
            &*e.key,
            &*e.aggregate_id,
            &*e.aggregate_type,
            &*e.event_type
        ),
        (ID, "o-1", "o-1", "order", "Created")
    );
    assert_eq!(
        (&*e.table, &*e.source, e.position, e.xid),
        ("public.outbox", "/public.outbox", CTX.position, 9)
    );
    assert_eq!(
        (e.schema_version, &e.occurred_at, &e.traceparent),
        (None, &None, &None)
    );
}

#[test]
fn optional_columns_are_used_when_present() {
    let mut columns = DEBEZIUM.to_vec();
    columns.extend([
        ("schema_version", INT),
        ("headers", JSONB_OID),
        ("occurred_at", TIMESTAMPTZ),
        ("traceparent", TEXT),
    ]);
    let e = event(map_with(
        None,
        &columns,
        &[
            Some(ID),
            Some("order"),
            Some("o-1"),
            Some("Created"),
            Some("{}"),
            Some("2"),
            Some(r#"{"x-tenant": "acme"}"#),
            Some("2026-11-22 22:39:38.658915+00"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
    ));
    assert_eq!(e.schema_version, Some(2));
    assert_eq!(e.headers, vec![(Arc::from("x-tenant"), Text::from("acme"))]);
    assert_eq!(
        e.occurred_at.as_deref(),
        Some("2026-11-22T22:39:38.658915Z")
    );
    assert!(e.traceparent.is_some());
}

#[test]
fn a_custom_mapping_renames_columns_places_extras_and_templates_the_source() {
    let mapping = TableMapping {
        id: "event_id".into(),
        aggregate_type: "kind".into(),
        aggregate_id: "account".into(),
        event_type: "name".into(),
        payload: "body".into(),
        key: Some("tenant".into()),
        additional: vec![
            AdditionalColumn {
                column: "tenant".into(),
                placement: Placement::Header,
                name: Some("x-tenant".into()),
            },
            AdditionalColumn {
                column: "region".into(),
                placement: Placement::Envelope,
                name: None,
            },
        ],
        source: "/billing/{aggregatetype}".into(),
        ..TableMapping::default()
    };
    let columns = [
        ("event_id", TEXT),
        ("kind", TEXT),
        ("account", TEXT),
        ("name", TEXT),
        ("body", TEXT),
        ("tenant", TEXT),
        ("region", TEXT),
    ];
    let e = event(map_with(
        Some(mapping),
        &columns,
        &[
            Some(ID),
            Some("invoice"),
            Some("a-9"),
            Some("Billed"),
            Some("[1]"),
            Some("acme"),
            Some("eu"),
        ],
    ));
    assert_eq!(
        (&*e.key, &*e.aggregate_id, &*e.source),
        ("acme", "a-9", "/billing/invoice")
    );
    assert_eq!(e.headers, vec![(Arc::from("x-tenant"), Text::from("acme"))]);
    assert_eq!(e.attributes, vec![(Arc::from("region"), Text::from("eu"))]);
}

#[test]
fn bad_rows_become_dead_letters_with_reasons() {
    type Case<'a> = (Vec<(&'a str, u32)>, Vec<Option<&'a str>>, &'a str);
    let text_outbox = vec![
        ("id", TEXT),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", TEXT),
    ];
    let mut with_optional = DEBEZIUM.to_vec();
    with_optional.extend([("schema_version", TEXT), ("headers", JSONB_OID)]);
    let cases: Vec<Case> = vec![
        (
            DEBEZIUM.to_vec(),
            vec![Some(ID), Some("order"), None, Some("T"), Some("{}")],
            "\"aggregateid\" is NULL",
        ),
        (
            text_outbox.clone(),
            vec![Some(" "), Some("order"), Some("o-1"), Some("T"), Some("{}")],
            "the id column is empty",
        ),
        (
            text_outbox,
            vec![
                Some(ID),
                Some("order"),
                Some("o-1"),
                Some("T"),
                Some("{oops"),
            ],
            "not valid JSON",
        ),
        (
            DEBEZIUM[..4].to_vec(),
            vec![Some(ID), Some("order"), Some("o-1"), Some("T")],
            "no column \"payload\"",
        ),
        (
            with_optional.clone(),
            vec![
                Some(ID),
                Some("o"),
                Some("o-1"),
                Some("T"),
                Some("{}"),
                Some("two"),
                None,
            ],
            "not an integer",
        ),
        (
            with_optional,
            vec![
                Some(ID),
                Some("o"),
                Some("o-1"),
                Some("T"),
                Some("{}"),
                None,
                Some(r#"{"a": 1}"#),
            ],
            "not a string",
        ),
    ];
    for (columns, values, expected) in cases {
        match map_with(None, &columns, &values) {
            Mapped::DeadLetter(d) => {
                assert!(
                    d.reason.contains(expected),
                    "{} does not mention {expected}",
                    d.reason
                );
                assert_eq!(
                    (d.position, d.table.as_str()),
                    (CTX.position, "public.outbox")
                );
                assert!(d.row.is_object());
            }
            _ => panic!("expected a dead letter for {expected}"),
        }
    }
    let configured_but_missing = TableMapping {
        schema_version: Some("version".into()),
        ..TableMapping::default()
    };
    match map_with(
        Some(configured_but_missing),
        &DEBEZIUM,
        &[Some(ID), Some("o"), Some("k"), Some("T"), Some("{}")],
    ) {
        Mapped::DeadLetter(d) => {
            assert!(d.reason.contains("no column \"version\""), "{}", d.reason)
        }
        _ => panic!("a configured optional column must exist"),
    }
}

#[test]
fn text_payloads_deeper_than_128_or_beyond_f64_are_json() {
    let text_outbox = [
        ("id", TEXT),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", TEXT),
    ];
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let huge = format!("[1e400, -1{}]", "0".repeat(400));
    for payload in [deep.as_str(), huge.as_str()] {
        let e = event(map_with(
            None,
            &text_outbox,
            &[Some(ID), Some("o"), Some("k"), Some("T"), Some(payload)],
        ));
        assert_eq!(e.payload, Payload::Json(Text::from(payload)));
    }
}

#[test]
fn dead_letters_keep_exact_bytes_where_jsonb_cannot() {
    let letter = |row: serde_json::Value, raw: Option<Vec<u8>>| DeadLetter {
        table: "message:outbox".into(),
        position: CTX.position,
        xid: 1,
        kind: "k",
        reason: "r".into(),
        row,
        raw,
        sink: None,
    };
    let exact = letter(serde_json::json!({"a": "b", "n": null}), None);
    assert_eq!(exact.storable(), (exact.row.clone(), None));
    let (row, raw) = letter(serde_json::json!("x\0y"), None).storable();
    assert_eq!(
        (row, raw),
        (serde_json::json!("x\u{FFFD}y"), Some(b"x\0y".to_vec()))
    );
    let (row, raw) = letter(serde_json::json!({"a": "x\0", "v": 2, "n": null}), None).storable();
    assert_eq!(
        row,
        serde_json::json!({"a": "x\u{FFFD}", "v": 2, "n": null})
    );
    assert_eq!(
        unframe_columns(&raw.unwrap()).unwrap(),
        [
            ("a".to_owned(), Some(b"x\0".to_vec())),
            ("n".to_owned(), None),
            ("v".to_owned(), Some(b"2".to_vec())),
        ]
    );
    // A row with bytes that are not UTF-8 (a SQL_ASCII database).
    let mut mapper = OutboxMapper::new(&["public.outbox".into()], &BTreeMap::new(), &[]);
    mapper.on_relation(relation("outbox", &DEBEZIUM));
    let data = Bytes::from([ID.as_bytes(), b"orderT{}caf\xe9"].concat());
    let values = [
        Value::Text(&data[..36]),
        Value::Text(&data[36..41]),
        Value::Text(&data[44..]),
        Value::Text(&data[41..42]),
        Value::Text(&data[42..44]),
    ];
    let row = Row {
        values: &values,
        frame: &data,
    };
    match mapper.map_insert(7, row, CTX).unwrap() {
        Mapped::DeadLetter(d) => {
            assert!(d.reason.contains("not valid UTF-8"), "{}", d.reason);
            assert_eq!(d.row["aggregateid"], "caf\u{FFFD}");
            let columns = unframe_columns(d.raw.as_deref().unwrap()).unwrap();
            assert_eq!(
                columns[2],
                ("aggregateid".to_owned(), Some(b"caf\xe9".to_vec()))
            );
            assert_eq!(columns[4], ("payload".to_owned(), Some(b"{}".to_vec())));
        }
        _ => panic!("expected a dead letter"),
    }
    assert_eq!(unframe_columns(b"name\0\0\0"), None);
}

#[test]
fn logical_messages_with_a_configured_prefix_are_events() {
    let mapper = OutboxMapper::new(&[], &BTreeMap::new(), &["outbox".into()]);
    let content = format!(
        r#"{{"id":"{ID}","aggregatetype":"order","aggregateid":"o-1","type":"Created","payload":{{"a":[1,2]}},"schema_version":4}}"#
    );
    let data = Bytes::from(content);
    fn message<'a>(prefix: &'a str, frame: &'a Bytes) -> Message<'a> {
        Message {
            prefix,
            content: frame,
            frame,
        }
    }
    let e = event(mapper.map_message(message("outbox", &data), CTX));
    assert_eq!(
        (
            &*e.table,
            &*e.source,
            &*e.key,
            e.payload.as_json().map(|json| json.as_str()),
            e.schema_version
        ),
        (
            "message:outbox",
            "/message:outbox",
            "o-1",
            Some(r#"{"a":[1,2]}"#),
            Some(4)
        )
    );
    assert!(matches!(
        mapper.map_message(message("other", &data), CTX),
        Mapped::NotOutbox
    ));
    let bad = Bytes::from_static(br#"{"id":"x"}"#);
    match mapper.map_message(message("outbox", &bad), CTX) {
        Mapped::DeadLetter(d) => assert!(d.reason.contains("missing field"), "{}", d.reason),
        _ => panic!("expected a dead letter"),
    }
}

#[test]
fn postgres_timestamps_become_rfc3339() {
    for (pg, rfc) in [
        (
            "2026-11-22 22:39:38.658915+00",
            Some("2026-11-22T22:39:38.658915Z"),
        ),
        (
            "2026-11-22 22:39:38+05:30",
            Some("2026-11-22T22:39:38+05:30"),
        ),
        (
            "2026-11-22 22:39:38.5-03",
            Some("2026-11-22T22:39:38.5-03:00"),
        ),
        ("2026-11-22 22:39:38", Some("2026-11-22T22:39:38Z")),
        ("infinity", None),
        ("22/11/2026 22:39:38", None),
        ("22/11/2026 22:39:38 CET", None),
        // Local mean time: Amsterdam in 1900 (+00:19:32), Dublin (-00:25:21).
        ("1900-01-01 00:00:00+00:19:32", Some("1899-12-31T23:40:28Z")),
        (
            "1900-03-01 00:10:00.25-00:25:21",
            Some("1900-03-01T00:35:21.25Z"),
        ),
        ("2000-02-29 23:59:59+23:59:59", Some("2000-02-29T00:00:00Z")),
        ("2000-02-29 00:00:00+00:19:3x", None),
        ("0001-01-01 00:00:00+00:19:32", Some("0000-12-31T23:40:28Z")),
        ("9999-12-31 23:59:59-00:19:32", None),
    ] {
        assert_eq!(pg_timestamp_to_rfc3339(pg).as_deref(), rfc, "{pg}");
    }
}

#[test]
fn a_replay_is_published_by_the_slot_it_names_only() {
    let key = ReplayKey::new(b"secret");
    let mapper = OutboxMapper::new(&[], &BTreeMap::new(), &[])
        .for_slot("outbox_relay_0_of_2")
        .with_replay_key(Some(key.clone()));
    let replay = |slot: Option<&str>| {
        let mut document = serde_json::json!({"id": ID, "aggregatetype": "order",
            "aggregateid": "o-1", "type": "Created", "payload": {"a": 1}});
        if let Some(slot) = slot {
            document["slot"] = serde_json::json!(slot);
        }
        let frame = Bytes::from(key.sign(&document));
        let message = Message {
            prefix: REPLAY_PREFIX,
            content: &frame,
            frame: &frame,
        };
        matches!(mapper.map_message(message, CTX), Mapped::Event(_))
    };
    assert!(replay(Some("outbox_relay_0_of_2")));
    assert!(
        replay(None),
        "a replay written before replays named their slot"
    );
    assert!(!replay(Some("outbox_relay_1_of_2")));
}

#[test]
fn a_forged_replay_naming_another_slot_is_still_a_dead_letter() {
    let mapper = OutboxMapper::new(&[], &BTreeMap::new(), &[])
        .for_slot("outbox_relay_0_of_2")
        .with_replay_key(Some(ReplayKey::new(b"secret")));
    let document = serde_json::json!({"id": ID, "aggregatetype": "order",
        "aggregateid": "o-1", "type": "Created", "payload": {}, "slot": "elsewhere"});
    let frame = Bytes::from(ReplayKey::new(b"not the key").sign(&document));
    let message = Message {
        prefix: REPLAY_PREFIX,
        content: &frame,
        frame: &frame,
    };
    assert!(matches!(
        mapper.map_message(message, CTX),
        Mapped::DeadLetter(_)
    ));
}
