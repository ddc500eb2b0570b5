-- ClickHouse DDL for the Eddy engagement pipeline (DESIGN §1, §6).
--
-- One row per enriched engagement event. The process job inserts every version of an event
-- (in batches, replays included); ReplacingMergeTree keeps, per id, the row with the highest
-- `version`, so a replay or an update never leaves a stale or duplicate row behind once parts
-- merge. Readers that need the exact current state query with FINAL and skip `deleted = 1` rows.
--
-- Portable on purpose: it runs on Debian's clickhouse-server 18.16 (no DateTime64, no
-- LowCardinality, no TTL, no CREATE OR REPLACE) as well as on current ClickHouse. Both statements
-- use IF NOT EXISTS, so applying the file again is harmless.

CREATE DATABASE IF NOT EXISTS eddy;

CREATE TABLE IF NOT EXISTS eddy.engagement_enriched
(
    id                 Int64,
    content_id         String,
    user_id            String,
    event_type         String,
    event_ts           DateTime,
    duration_ms        Nullable(Int32),
    device             String,
    engagement_seconds Nullable(Float64),
    content_type       Nullable(String),
    length_seconds     Nullable(Int32),
    slug               Nullable(String),
    title              Nullable(String),
    engagement_pct     Nullable(Float64),
    version            UInt64,
    deleted            UInt8
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;
