-- A least-privilege role for the relay. Run as a superuser (or the database owner) once;
-- set the password out of band, e.g. \password outbox_relay in psql.
--
-- The relay needs: LOGIN and REPLICATION (to stream from a slot), SELECT on the outbox
-- tables (pgoutput reads them through the slot's snapshot; `check` verifies it), and its own
-- schema for checkpoints and dead letters. It needs nothing on any other table.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay WITH LOGIN REPLICATION;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT ON public.outbox TO outbox_relay;

-- The relay's schema, owned by the relay so `outbox-relay init` can create its tables.
CREATE SCHEMA IF NOT EXISTS outbox_relay AUTHORIZATION outbox_relay;

-- Creating a publication needs ownership of the tables: the table owner creates it once.
-- (`outbox-relay init` does this itself when it runs as the owner.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'outbox_relay') THEN
        CREATE PUBLICATION outbox_relay FOR TABLE public.outbox;
    END IF;
END
$$;
