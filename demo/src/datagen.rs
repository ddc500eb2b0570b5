//! A data generator for the engagement pipeline's source tables (DESIGN §1).
//!
//! It creates the tables if they are missing (`content`, `engagement_events`, both `REPLICA
//! IDENTITY FULL`, and the `content_dim_view` the lookup reads), upserts `contents` content rows
//! whose ids and attributes are derived from the seed, then inserts engagement events at `rate`
//! per second, one transaction per 100 ms tick, for `seconds` or until `count` events. With each
//! event it may also update (`updates_pct`) or delete (`deletes_pct`) an earlier event of this
//! run, and `unknown_pct` of events name a content id that does not exist. Every choice comes from
//! a SplitMix64 generator seeded with `seed`, so two runs with the same flags make the same
//! choices (the database assigns event ids and timestamps).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct DatagenOptions {
    /// `postgres://user@host:port/db`.
    pub pg_url: String,
    /// Content rows.
    pub contents: u32,
    /// Events inserted per second.
    pub rate: u32,
    /// Run time; `None` with a `count` runs until the count is reached.
    pub seconds: Option<f64>,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Seed of every choice.
    pub seed: u64,
    /// Percentage of events followed by an update of an earlier event.
    pub updates_pct: f64,
    /// Percentage of events followed by a delete of an earlier event.
    pub deletes_pct: f64,
    /// Percentage of events naming an unknown content id.
    pub unknown_pct: f64,
    /// Create the tables and view when missing.
    pub create_schema: bool,
}

/// What was done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events inserted.
    pub inserted: u64,
    /// Events updated.
    pub updated: u64,
    /// Events deleted.
    pub deleted: u64,
    /// Inserted events naming unknown content.
    pub unknown: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "inserted={} updated={} deleted={} unknown_content={}", self.inserted, self.updated, self.deleted, self.unknown)
    }
}

/// SplitMix64: tiny, fast and good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator; different `stream`s of one seed are independent.
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 100.0 < pct
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A random (version 4) UUID in its text form.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        let a = (a & !0xF000) | 0x4000; // version 4
        let b = (b & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
        format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}", a >> 32, (a >> 16) & 0xFFFF, a & 0xFFFF, b >> 48, b & 0xFFFF_FFFF_FFFF)
    }
}

const CONTENT_TYPES: [&str; 3] = ["podcast", "newsletter", "video"];
const EVENT_TYPES: [&str; 4] = ["play", "pause", "finish", "click"];
const DEVICES: [&str; 4] = ["ios", "android", "web", "tv"];
/// Distinct users events are drawn from.
const USERS: u64 = 500;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS content (
    id uuid PRIMARY KEY,
    slug text NOT NULL,
    title text NOT NULL,
    content_type text NOT NULL CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds int NOT NULL,
    publish_ts timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS engagement_events (
    id bigserial PRIMARY KEY,
    content_id uuid,
    user_id uuid,
    event_type text CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts timestamptz NOT NULL DEFAULT now(),
    duration_ms int,
    device text,
    raw_payload jsonb
);
";

/// A content row, all derived from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    /// Its id.
    pub id: String,
    /// `content-<n>`.
    pub slug: String,
    /// Its type: podcast, newsletter or video.
    pub content_type: &'static str,
    /// Length; about one in ten is 0 (no engagement percentage).
    pub length_seconds: i32,
    /// Days before now it was published.
    pub published_days_ago: i32,
}

/// The `n` content rows of `seed`.
pub fn contents(seed: u64, n: u32) -> Vec<Content> {
    let mut rng = Rng::new(seed, 1);
    (0..n)
        .map(|i| {
            let id = rng.uuid();
            let content_type = *rng.pick(&CONTENT_TYPES);
            let length_seconds = if rng.chance(10.0) { 0 } else { 30 + rng.below(3600) as i32 };
            Content { id, slug: format!("content-{i}"), content_type, length_seconds, published_days_ago: rng.below(365) as i32 }
        })
        .collect()
}

/// Creates the schema if asked, writes the content rows and runs the event stream.
pub async fn run(o: &DatagenOptions, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<Summary> {
    anyhow::ensure!(o.rate > 0, "--rate must be at least 1 event per second");
    anyhow::ensure!(o.contents > 0, "--contents must be at least 1");
    let (mut client, connection) = tokio_postgres::connect(&o.pg_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", o.pg_url))?;
    let connection = tokio::spawn(connection);
    if o.create_schema {
        create_schema(&client).await?;
    }
    let catalog = contents(o.seed, o.contents);
    let upsert = client
        .prepare(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) \
             VALUES ($1::text::uuid, $2, $3, $4, $5, now() - make_interval(days => $6)) ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    for c in &catalog {
        let title = format!("{} {}", c.content_type, c.slug);
        client.execute(&upsert, &[&c.id, &c.slug, &title, &c.content_type, &c.length_seconds, &c.published_days_ago]).await?;
    }

    let insert = client
        .prepare(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) \
             VALUES ($1::text::uuid, $2::text::uuid, $3, now(), $4, $5, $6::text::jsonb) RETURNING id",
        )
        .await?;
    let update = client.prepare("UPDATE engagement_events SET duration_ms = $2, event_type = $3 WHERE id = $1").await?;
    let delete = client.prepare("DELETE FROM engagement_events WHERE id = $1").await?;

    let mut rng = Rng::new(o.seed, 2);
    let users: Vec<String> = {
        let mut r = Rng::new(o.seed, 3);
        (0..USERS).map(|_| r.uuid()).collect()
    };
    let mut live: Vec<i64> = Vec::new();
    let mut summary = Summary::default();
    let tick = Duration::from_millis(100);
    let started = Instant::now();
    let deadline = match (o.seconds, o.count) {
        (Some(s), _) => Some(started + Duration::from_secs_f64(s.max(0.0))),
        (None, Some(_)) => None,
        (None, None) => Some(started + Duration::from_secs(20)),
    };
    let mut next_tick = started;
    tokio::pin!(stop);
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) || o.count.is_some_and(|c| summary.inserted >= c) {
            break;
        }
        // Events due by now at `rate`, capped by `count`.
        let elapsed = now.duration_since(started).as_secs_f64();
        let due = (elapsed * f64::from(o.rate)).ceil() as u64;
        let due = o.count.map_or(due, |c| due.min(c));
        let n = due.saturating_sub(summary.inserted).max(u64::from(summary.inserted == 0));
        let tx = client.transaction().await?;
        for _ in 0..n {
            let unknown = rng.chance(o.unknown_pct);
            let content_id = if unknown { Rng::new(rng.next_u64(), 4).uuid() } else { rng.pick(&catalog).id.clone() };
            let user_id = rng.pick(&users).clone();
            let event_type = *rng.pick(&EVENT_TYPES);
            let duration_ms: Option<i32> = if rng.chance(10.0) { None } else { Some(500 + rng.below(600_000) as i32) };
            let device = *rng.pick(&DEVICES);
            let mut payload = String::new();
            let _ = write!(
                payload,
                r#"{{"session":"{:016x}","app_version":"1.{}","seq":{}}}"#,
                rng.next_u64(),
                rng.below(10),
                summary.inserted
            );
            let row = tx.query_one(&insert, &[&content_id, &user_id, &event_type, &duration_ms, &device, &payload]).await?;
            live.push(row.get(0));
            summary.inserted += 1;
            summary.unknown += u64::from(unknown);

            if !live.is_empty() && rng.chance(o.updates_pct) {
                let id = live[rng.below(live.len() as u64) as usize];
                let duration_ms: Option<i32> = Some(500 + rng.below(600_000) as i32);
                let event_type = *rng.pick(&EVENT_TYPES);
                summary.updated += tx.execute(&update, &[&id, &duration_ms, &event_type]).await?;
            }
            if !live.is_empty() && rng.chance(o.deletes_pct) {
                let id = live.swap_remove(rng.below(live.len() as u64) as usize);
                summary.deleted += tx.execute(&delete, &[&id]).await?;
            }
        }
        tx.commit().await?;
        next_tick += tick;
        tokio::select! {
            biased;
            // Ctrl-C: stop after the committed tick and report.
            _ = &mut stop => break,
            // Pace the ticks.
            _ = tokio::time::sleep_until(next_tick) => {}
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(summary)
}

async fn create_schema(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client.batch_execute(SCHEMA).await.context("creating the tables")?;
    for table in ["content", "engagement_events"] {
        let full: bool =
            client.query_one("SELECT relreplident = 'f' FROM pg_class WHERE oid = $1::text::regclass", &[&table]).await?.get(0);
        if !full {
            client.batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")).await?;
        }
    }
    let view: bool = client.query_one("SELECT EXISTS (SELECT 1 FROM pg_views WHERE viewname = 'content_dim_view')", &[]).await?.get(0);
    if !view {
        client
            .batch_execute(
                "CREATE VIEW content_dim_view AS \
                 SELECT id::text AS id, slug, title, content_type, length_seconds, publish_ts FROM content",
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_follow_the_seed() {
        assert_eq!(contents(42, 50), contents(42, 50));
        assert_ne!(contents(42, 5), contents(43, 5));
        let c = contents(42, 500);
        assert!(c.iter().any(|c| c.length_seconds == 0) && c.iter().filter(|c| c.length_seconds > 0).count() > 400);
        for t in CONTENT_TYPES {
            assert!(c.iter().any(|c| c.content_type == t));
        }
        let id = &c[0].id;
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn chance_matches_its_percentage() {
        let mut r = Rng::new(7, 0);
        let hits = (0..100_000).filter(|_| r.chance(5.0)).count();
        assert!((4_500..5_500).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| r.below(3) < 3));
        assert!(!(0..1000).any(|_| r.chance(0.0)));
    }

    /// Runs against a real PostgreSQL (`EDDY_TEST_PG_URL`): the tables end up with what the summary
    /// says was done.
    #[tokio::test]
    async fn writes_what_it_reports() {
        let Ok(url) = std::env::var("EDDY_TEST_PG_URL") else {
            eprintln!("skipped: set EDDY_TEST_PG_URL=postgres://user@127.0.0.1:PORT/db to run against a real PostgreSQL");
            return;
        };
        let count = |url: String| async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let exists: bool = client.query_one("SELECT to_regclass('engagement_events') IS NOT NULL", &[]).await.unwrap().get(0);
            if !exists {
                return 0;
            }
            client.query_one("SELECT count(*) FROM engagement_events", &[]).await.unwrap().get::<_, i64>(0)
        };
        let before = count(url.clone()).await;
        let o = DatagenOptions {
            pg_url: url.clone(),
            contents: 20,
            rate: 2000,
            seconds: None,
            count: Some(300),
            seed: 7,
            updates_pct: 10.0,
            deletes_pct: 5.0,
            unknown_pct: 10.0,
            create_schema: true,
        };
        let summary = run(&o, std::future::pending()).await.unwrap();
        assert_eq!(summary.inserted, 300);
        assert!(summary.updated > 0 && summary.deleted > 0 && summary.unknown > 0, "{summary}");
        assert_eq!(count(url).await - before, (summary.inserted - summary.deleted) as i64);
    }
}
