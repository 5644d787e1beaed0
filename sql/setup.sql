-- usersync setup for table public.users (publication usersync_users, slot usersync, origin usersync).
-- Idempotent: safe to run again. Run each statement on its own (psql -f does);
-- a logical slot cannot be created inside a transaction that wrote.

-- The two columns usersync writes back: the external service's id and the time of the last successful sync.
ALTER TABLE "public"."users" ADD COLUMN IF NOT EXISTS external_user_id text,
    ADD COLUMN IF NOT EXISTS external_synced_at timestamptz;

-- usersync's own objects live in their own schema.
CREATE SCHEMA IF NOT EXISTS usersync;

-- Changes the external service refused, and the later changes of those users parked behind them.
CREATE TABLE IF NOT EXISTS usersync.dead_letters (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    user_key text NOT NULL,
    operation text NOT NULL,
    state text NOT NULL CHECK (state IN ('failed', 'parked')),
    envelope jsonb NOT NULL,
    last_status integer,
    last_error text NOT NULL,
    attempts integer NOT NULL,
    first_attempt_at timestamptz NOT NULL,
    last_attempt_at timestamptz NOT NULL,
    commit_lsn pg_lsn NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_user_key ON usersync.dead_letters (user_key, id);

-- The newest change made durable per user, so a restart does not push what was already written back.
CREATE TABLE IF NOT EXISTS usersync.user_progress (
    user_key text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    position integer NOT NULL
);
ALTER TABLE usersync.user_progress SET (fillfactor = 75);

-- One row per synced or dead-lettered change (keys, outcome, timings; no row values), for "when was this user last synced"; pruned after sync_log.retention_days.
CREATE TABLE IF NOT EXISTS usersync.sync_log (
    id bigserial,
    logged_at timestamptz NOT NULL DEFAULT now(),
    event_id text,
    operation text NOT NULL,
    user_key text NOT NULL,
    external_id text,
    outcome text NOT NULL,
    attempts integer NOT NULL,
    push_ms double precision,
    latency_ms double precision,
    commit_lsn pg_lsn
);
ALTER TABLE usersync.sync_log DROP CONSTRAINT IF EXISTS sync_log_pkey;
DROP INDEX IF EXISTS usersync.sync_log_user_key_idx;
DROP INDEX IF EXISTS usersync.sync_log_logged_at_idx;
CREATE INDEX IF NOT EXISTS sync_log_logged_at_brin ON usersync.sync_log USING brin (logged_at) WITH (autosummarize = on);

-- Deletes and updates carry the whole old row, so a delete reaches the external service with its external id although the row is gone.
ALTER TABLE "public"."users" REPLICA IDENTITY FULL;

-- The publication the slot streams: the users table only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'usersync_users') THEN
        CREATE PUBLICATION "usersync_users" FOR TABLE "public"."users";
    ELSIF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'usersync_users'
                      AND schemaname = 'public' AND tablename = 'users') THEN
        ALTER PUBLICATION "usersync_users" ADD TABLE "public"."users";
    END IF;
END
$$;

-- PostgreSQL 18 and later stream stored generated columns when the publication asks for them; earlier versions cannot (usersync then lists them in `omitted`).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE format('ALTER PUBLICATION %I SET (publish_generated_columns = stored)', 'usersync_users');
    END IF;
END
$$;

-- The replication origin that tags usersync's write-backs, so the daemon never pushes its own writes again.
SELECT pg_replication_origin_create('usersync')
    WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'usersync');

-- The logical replication slot: PostgreSQL keeps WAL from here until usersync confirms it. On PostgreSQL 17+ it is a failover slot (5th argument), which a standby with sync_replication_slots = on keeps a copy of, so usersync continues after a promotion.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'usersync') THEN
        IF current_setting('server_version_num')::int >= 170000 THEN
            PERFORM pg_create_logical_replication_slot('usersync', 'pgoutput', false, false, true);
        ELSE
            PERFORM pg_create_logical_replication_slot('usersync', 'pgoutput');
        END IF;
    END IF;
END
$$;

-- Sync requests (backfill, sync-user, switching sync back on): each row asks the daemon to push one user's current state.
CREATE TABLE IF NOT EXISTS usersync.sync_requests (
    id bigserial PRIMARY KEY,
    user_key text NOT NULL,
    reason text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz,
    outcome text,
    external_id text,
    error text,
    latency_ms double precision
);

-- Requests travel through the stream, ordered with the users' own changes.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'usersync_users'
                   AND schemaname = 'usersync' AND tablename = 'sync_requests') THEN
        ALTER PUBLICATION "usersync_users" ADD TABLE usersync.sync_requests;
    END IF;
END
$$;

-- Users changed while sync was switched off ([sync] enabled = false), pushed when it is switched on.
CREATE TABLE IF NOT EXISTS usersync.pending_users (
    user_key text PRIMARY KEY,
    first_changed_at timestamptz NOT NULL DEFAULT now()
);

-- A hash of the values last pushed per user, so backfill can tell which rows changed since.
ALTER TABLE usersync.user_progress ADD COLUMN IF NOT EXISTS values_hash text;

-- The backfill's resumable cursor (one row).
CREATE TABLE IF NOT EXISTS usersync.backfill (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    mode text NOT NULL,
    cursor text,
    rows_total bigint,
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    rows_queued bigint NOT NULL DEFAULT 0
);

-- Inbound webhook events applied or refused, by source and event id: a redelivery finds its id here and writes nothing.
CREATE TABLE IF NOT EXISTS usersync.inbound_events (
    source text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    subject text NOT NULL,
    outcome text NOT NULL DEFAULT 'received',
    user_key text,
    error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    body bytea,
    message_id text,
    delivered_at bigint,
    PRIMARY KEY (source, event_id)
);
ALTER TABLE usersync.inbound_events ADD COLUMN IF NOT EXISTS body bytea,
    ADD COLUMN IF NOT EXISTS message_id text, ADD COLUMN IF NOT EXISTS delivered_at bigint;
CREATE INDEX IF NOT EXISTS inbound_events_failed ON usersync.inbound_events (received_at) WHERE outcome = 'failed';
CREATE INDEX IF NOT EXISTS inbound_events_deferred ON usersync.inbound_events (received_at) WHERE outcome = 'deferred';

-- Each inbound source's newest event, for `usersync status` and the status page, without scanning the table.
CREATE INDEX IF NOT EXISTS inbound_events_recent ON usersync.inbound_events (source, received_at)

-- The newest provider version applied per inbound object (deletes leave a tombstone), so older deliveries change nothing.
CREATE TABLE IF NOT EXISTS usersync.inbound_versions (
    source text NOT NULL,
    stream text NOT NULL,
    subject text NOT NULL,
    version bigint NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source, stream, subject)
);

-- Rows an inbound source's delete unlinked (on_delete = "unlink"), so `reconcile --from` that source counts them as agreeing.
CREATE TABLE IF NOT EXISTS usersync.inbound_unlinked (
    source text NOT NULL,
    user_key text NOT NULL,
    external_id text NOT NULL,
    unlinked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, user_key)
);

-- Where an unfinished `usersync import` of each source stopped (the list cursor after the last page applied), so a crashed import resumes there.
CREATE TABLE IF NOT EXISTS usersync.import_cursors (
    source text PRIMARY KEY,
    cursor text,
    pages bigint NOT NULL DEFAULT 0,
    records bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
