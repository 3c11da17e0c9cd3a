-- The application's outbox table, in the layout of Debezium's outbox event router, so teams
-- moving from Debezium keep their table. The application inserts one row per event in the
-- same transaction as its business change; the relay publishes it after commit.
--
-- Updates and deletes on this table are not events: the relay counts and skips them, so the
-- "insert, then delete in the same transaction" housekeeping pattern works.
CREATE TABLE IF NOT EXISTS public.outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),  -- event id, for consumer dedup
    aggregatetype text        NOT NULL,   -- e.g. 'order': used for routing
    aggregateid   text        NOT NULL,   -- the ordering key: events of one aggregate stay in order
    type          text        NOT NULL,   -- e.g. 'OrderCreated'
    payload       jsonb       NOT NULL,   -- the event body
    created_at    timestamptz NOT NULL DEFAULT now()
);
