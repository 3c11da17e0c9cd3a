-- The relay's own state. `outbox-relay init` applies this file (with `outbox_relay` replaced
-- by relay.schema when that is set); it is idempotent.
-- Created only when missing: CREATE SCHEMA IF NOT EXISTS would still need CREATE on the
-- database, which a least-privilege role (003_relay_role.sql) does not have.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'outbox_relay') THEN
        CREATE SCHEMA outbox_relay;
    END IF;
END
$$;

-- Per (slot, sink): every event at or below (commit_lsn, event_index) is acknowledged by the
-- sink. On restart, events at or below it are skipped for that sink.
CREATE TABLE IF NOT EXISTS outbox_relay.checkpoints (
    slot        text        NOT NULL,
    sink        text        NOT NULL,
    commit_lsn  pg_lsn      NOT NULL,
    event_index integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, sink)
);

-- Rows that could not become events (sink = '') or that a sink refused for good, with the
-- reason and the raw row. Replays after a crash do not duplicate them.
CREATE TABLE IF NOT EXISTS outbox_relay.dead_letters (
    id           bigserial   PRIMARY KEY,
    slot         text        NOT NULL,
    sink         text        NOT NULL DEFAULT '',
    source_table text        NOT NULL,
    commit_lsn   pg_lsn      NOT NULL,
    event_index  integer     NOT NULL,
    xid          bigint      NOT NULL,
    reason       text        NOT NULL,
    row_data     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (slot, sink, commit_lsn, event_index)
);

-- The exact bytes of a dead letter whose row_data is not exact: jsonb holds neither NUL
-- characters nor bytes that are not UTF-8 (a SQL_ASCII database), so row_data has U+FFFD in
-- their place. NULL when row_data is exact. For a logical message: its content; for a row:
-- each column as its name, a NUL byte, a 4-byte big-endian length (FFFFFFFF for NULL) and
-- the value's bytes. `outbox-relay dlq show` prints it readably.
ALTER TABLE outbox_relay.dead_letters ADD COLUMN IF NOT EXISTS raw bytea;

-- Set by `outbox-relay dlq replay` when a (fixed) dead letter was published again.
ALTER TABLE outbox_relay.dead_letters ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

-- Backfill runs per slot (source.backfill): a run without finished_at was interrupted and
-- is started over, slot included.
CREATE TABLE IF NOT EXISTS outbox_relay.backfills (
    slot             text        PRIMARY KEY,
    consistent_point pg_lsn      NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    rows             bigint
);

-- The key `outbox-relay dlq replay` signs its logical messages with (HMAC-SHA256), and the
-- relay verifies them with: any role that can connect may call pg_logical_emit_message, so
-- only a signed replay becomes an event. Readable by the schema's owner and the relay's role
-- only. 32 bytes from two random UUIDs (244 random bits; gen_random_uuid needs no extension).
CREATE TABLE IF NOT EXISTS outbox_relay.replay_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key       bytea   NOT NULL
);
REVOKE ALL ON outbox_relay.replay_key FROM PUBLIC;
INSERT INTO outbox_relay.replay_key (key)
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT DO NOTHING;

-- Per slot: the server the relay streams from (IDENTIFY_SYSTEM's system identifier and
-- timeline) and the LSN its stream started at, written when the relay creates the slot or
-- first streams from it. A missing slot with a row here was dropped (or the server is a
-- promoted standby); a row of another system identifier means the relay's state comes from
-- another server. Either way the relay stops rather than skip events (src/origin.rs).
CREATE TABLE IF NOT EXISTS outbox_relay.slots (
    slot        text        PRIMARY KEY,
    system_id   text        NOT NULL,
    timeline    bigint      NOT NULL,
    start_lsn   pg_lsn      NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
