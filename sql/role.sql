-- usersync least-privilege role usersync for table public.users.
-- Run as a superuser after the setup script (CREATE ROLE ... REPLICATION and
-- GRANT on the replication origin functions need one). Idempotent.

-- The role usersync connects as: it may log in and stream a replication slot, nothing more. usersync sets no password: set one with \password in psql (or ALTER ROLE ... PASSWORD) and give it to usersync through database.password_env.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'usersync') THEN
        CREATE ROLE "usersync" LOGIN REPLICATION;
    ELSE
        ALTER ROLE "usersync" LOGIN REPLICATION;
    END IF;
END
$$;

-- Read the users table (replays and backfills read current rows).
GRANT USAGE ON SCHEMA "public" TO "usersync";
GRANT SELECT ON "public"."users" TO "usersync";

-- Write back only the two sync columns: no other column can be changed by this role.
GRANT UPDATE (external_user_id, external_synced_at) ON "public"."users" TO "usersync";

-- usersync's own tables (dead letters, progress, and those later versions add): read and write rows, create nothing.
GRANT USAGE ON SCHEMA usersync TO "usersync";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA usersync TO "usersync";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA usersync TO "usersync";
ALTER DEFAULT PRIVILEGES IN SCHEMA usersync GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "usersync";
ALTER DEFAULT PRIVILEGES IN SCHEMA usersync GRANT USAGE, SELECT ON SEQUENCES TO "usersync";

-- The replication origin functions the write-back calls to tag its transactions (superuser-only by default).
GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO "usersync";
GRANT EXECUTE ON FUNCTION pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone) TO "usersync";
GRANT EXECUTE ON FUNCTION pg_replication_origin_progress(text, boolean) TO "usersync";
