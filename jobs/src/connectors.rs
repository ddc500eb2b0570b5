//! The connectors a spec may name, their options and the schemas they produce. The worker implements
//! them; they are described here so that a spec is fully checked before anything runs.

use serde::Deserialize;

use crate::{DataType, Field, Schema};

/// A source connector with its checked options.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConnector {
    /// Deterministic synthetic events.
    Generator(GeneratorOptions),
}

/// A sink connector with its checked options.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkConnector {
    /// Newline-delimited JSON, one file per sink subtask.
    File(FileSinkOptions),
    /// Drops every row (for benchmarks).
    Discard,
}

/// Options of the `generator` source. Row `seq` (0, 1, 2, …) has key `k` in `1..=keys` and a whole-number
/// `score` in `0..=100`, both drawn from a hash of (`seed`, `seq`); its event time `ts` is
/// `start_ms + seq / events_per_ms`, minus up to `disorder_ms` (also hashed) to make it out of order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorOptions {
    /// Rows to produce in total (over all subtasks); unbounded when absent.
    pub count: Option<u64>,
    /// Distinct keys.
    #[serde(default = "default_keys")]
    pub keys: u64,
    /// Seed of the pseudo-random columns.
    #[serde(default)]
    pub seed: u64,
    /// Event-time density: rows per millisecond of event time.
    #[serde(default = "default_events_per_ms")]
    pub events_per_ms: u64,
    /// Event time of row 0, Unix ms.
    #[serde(default)]
    pub start_ms: i64,
    /// Largest backwards shift of a row's event time.
    #[serde(default)]
    pub disorder_ms: u64,
    /// Rows per second over all subtasks; as fast as possible when absent.
    pub rate: Option<u64>,
}

fn default_keys() -> u64 {
    1000
}
fn default_events_per_ms() -> u64 {
    10
}

impl GeneratorOptions {
    /// The rows the generator produces.
    pub fn schema() -> Schema {
        Schema::new(vec![
            Field::new("seq", DataType::Int),
            Field::new("k", DataType::Int),
            Field::new("score", DataType::Float),
            Field::new("ts", DataType::Timestamp),
        ])
    }
}

/// Options of the `file` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkOptions {
    /// Output path; subtask `i` of a sink with parallelism > 1 writes `<path>.<i>`.
    pub path: String,
    /// Throttle: at most this many rows per second per subtask (for backpressure tests and demos).
    pub rows_per_second: Option<u64>,
}

/// Checks a source's connector name and options; returns the connector and its schema.
pub fn source(name: &str, options: &toml::Table) -> Result<(SourceConnector, Schema), String> {
    match name {
        "generator" => {
            let o: GeneratorOptions = decode(options)?;
            if o.keys == 0 {
                return Err("options.keys: must be at least 1".into());
            }
            if o.events_per_ms == 0 {
                return Err("options.events_per_ms: must be at least 1".into());
            }
            if o.rate == Some(0) {
                return Err("options.rate: must be at least 1 row per second (omit it for no limit)".into());
            }
            Ok((SourceConnector::Generator(o), GeneratorOptions::schema()))
        }
        other => Err(format!("connector: unknown source connector `{other}`; available: generator")),
    }
}

/// Checks a sink's connector name and options.
pub fn sink(name: &str, options: &toml::Table) -> Result<SinkConnector, String> {
    match name {
        "file" => {
            let o: FileSinkOptions = decode(options)?;
            if o.path.trim().is_empty() {
                return Err("options.path: must not be empty".into());
            }
            if o.rows_per_second == Some(0) {
                return Err("options.rows_per_second: must be at least 1 (omit it for no limit)".into());
            }
            Ok(SinkConnector::File(o))
        }
        "discard" | "blackhole" => {
            decode::<Empty>(options)?;
            Ok(SinkConnector::Discard)
        }
        other => Err(format!("connector: unknown sink connector `{other}`; available: file, discard")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn decode<T: serde::de::DeserializeOwned>(options: &toml::Table) -> Result<T, String> {
    toml::Value::Table(options.clone())
        .try_into()
        .map_err(|e: toml::de::Error| format!("options: {}", e.message()))
}
