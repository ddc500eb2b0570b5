-- PostgreSQL schema for the Eddy engagement pipeline (DESIGN §1), for PostgreSQL 15.
--
-- Source tables of the ingest job's CDC stream, the publication it reads them through (pgoutput)
-- and the view the process job uses for its content lookup. The server must run with
-- wal_level = logical. Every statement is idempotent, so the file can be applied on every start.

CREATE TABLE IF NOT EXISTS content (
    id             uuid PRIMARY KEY,
    slug           text,
    title          text,
    content_type   text CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds int,
    publish_ts     timestamptz
);

CREATE TABLE IF NOT EXISTS engagement_events (
    id          bigserial PRIMARY KEY,
    content_id  uuid,
    user_id     uuid,
    event_type  text CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts    timestamptz,
    duration_ms int NULL,
    device      text,
    raw_payload jsonb
);

-- Old rows in full in the WAL, so that updates and deletes carry every column (the ingest job
-- emits upserts and tombstones from them). Setting it again is a no-op.
ALTER TABLE content REPLICA IDENTITY FULL;
ALTER TABLE engagement_events REPLICA IDENTITY FULL;

-- The publication the ingest job's logical replication slot (pgoutput) subscribes to.
-- CREATE PUBLICATION has no IF NOT EXISTS, hence the DO block.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'eddy_pub') THEN
        CREATE PUBLICATION eddy_pub FOR TABLE content, engagement_events;
    END IF;
END
$$;

-- Lookup dimension for the process job: the id as text, to match the JSON events' content_id.
CREATE OR REPLACE VIEW content_dim_view AS
SELECT id::text AS id, slug, title, content_type, length_seconds, publish_ts
FROM content;
