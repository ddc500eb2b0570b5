//! The job-spec file format (TOML) and its `${VAR}` substitution.
//!
//! A spec lists stages by kind — `[[source]]`, `[[transform]]`, `[[window]]`, `[[sink]]` — each with
//! a unique `name` and (except sources) an `input` naming the stage it reads. A window's late records
//! are readable as the stage `<window>.late`. See the README for a full example.

use serde::Deserialize;

use crate::SpecError;

/// A whole job spec, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name, shown by `eddy jobs`.
    pub name: String,
    /// Default parallelism of every stage that sets none (default 1).
    pub parallelism: Option<u32>,
    /// Number of key groups hash exchanges route by (default 128); bounds any stage's parallelism.
    pub max_parallelism: Option<u32>,
    /// Sources.
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceSpec>,
    /// Row-wise transforms (projection and filter).
    #[serde(default, rename = "transform")]
    pub transforms: Vec<TransformSpec>,
    /// Keyed event-time windows.
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowSpec>,
    /// Lookup joins against external tables.
    #[serde(default, rename = "lookup")]
    pub lookups: Vec<LookupSpec>,
    /// Sinks.
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkSpec>,
    /// Where keyed state lives and how often it is checkpointed.
    #[serde(default)]
    pub state: StateSpec,
}

/// The `[state]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// `rocksdb` (default) or `memory`.
    pub backend: Option<String>,
    /// Time between checkpoints, e.g. `5s` (default); `0s` turns checkpoints off.
    pub checkpoint_interval: Option<String>,
}

/// A `[[source]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Stage name.
    pub name: String,
    /// Connector name, e.g. `generator`.
    pub connector: String,
    /// Parallel instances.
    pub parallelism: Option<u32>,
    /// Connector options; each connector checks its own.
    #[serde(default)]
    pub options: toml::Table,
    /// Event-time column and watermark settings.
    pub event_time: Option<EventTimeSpec>,
}

/// How a source assigns event time and watermarks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeSpec {
    /// A TIMESTAMP column of the source.
    pub column: String,
    /// Watermark = max event time seen − this delay (default `0s`).
    pub allowed_delay: Option<String>,
    /// After this long without records the watermark advances with wall-clock time (default `5s`).
    pub idle_timeout: Option<String>,
}

/// A `[[transform]]` table: `SELECT <select> FROM <input> WHERE <where>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// Stage name.
    pub name: String,
    /// The stage read.
    pub input: String,
    /// SQL select list, e.g. `k, score * 2 AS doubled, ts`; default: all columns.
    pub select: Option<String>,
    /// SQL filter; rows where it is not TRUE are dropped.
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// Parallel instances.
    pub parallelism: Option<u32>,
    /// Exchange from the input: `forward`, `rebalance`, `hash`, `broadcast` or `global`.
    pub partition: Option<String>,
    /// Columns to hash by when `partition = "hash"`.
    pub key: Option<Vec<String>>,
    /// A row the expressions fail on (a bad CAST, an overflow): `drop` it (the default: counted
    /// and logged), set it aside in `dead_letter_path` with the reason (`dead-letter`), or `fail`
    /// the job.
    #[serde(default = "drop_bad_rows")]
    pub bad_records: crate::connectors::BadRecordPolicy,
    /// File for `bad_records = "dead-letter"`.
    pub dead_letter_path: Option<String>,
}

fn drop_bad_rows() -> crate::connectors::BadRecordPolicy {
    crate::connectors::BadRecordPolicy::Drop
}

/// A `[[lookup]]` table: a LEFT join of each row with the external row whose key equals `on`.
/// Output: the input's columns, then the looked-up columns (NULL when no row matches).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    /// Stage name.
    pub name: String,
    /// The stage read.
    pub input: String,
    /// Connector name: `postgres`.
    pub connector: String,
    /// Input column matched against the external key.
    pub on: String,
    /// Connector options.
    #[serde(default)]
    pub options: toml::Table,
    /// Parallel instances.
    pub parallelism: Option<u32>,
}

/// A `[[window]]` table: a keyed TUMBLE or HOP window on event time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Stage name.
    pub name: String,
    /// The stage read.
    pub input: String,
    /// `tumble` or `hop`.
    pub kind: String,
    /// Window length, e.g. `10m`.
    pub size: String,
    /// Distance between window starts (HOP only), e.g. `5s`.
    pub slide: Option<String>,
    /// Grouping columns.
    pub key: Vec<String>,
    /// Aggregates as a SQL list: `SUM(score) AS total, COUNT(*) AS n`.
    pub aggregates: String,
    /// The TIMESTAMP column windows are assigned by (default: the source's event-time column).
    pub time: Option<String>,
    /// Parallel instances.
    pub parallelism: Option<u32>,
    /// A row an aggregate's argument fails on (an overflow, a bad CAST): `drop` it (the default:
    /// counted and logged), set it aside in `dead_letter_path` with the reason (`dead-letter`),
    /// or `fail` the job. The row then counts in no window, as an insert or as a retraction.
    #[serde(default = "drop_bad_rows")]
    pub bad_records: crate::connectors::BadRecordPolicy,
    /// File for `bad_records = "dead-letter"`.
    pub dead_letter_path: Option<String>,
}

/// A `[[sink]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// Stage name.
    pub name: String,
    /// The stage read (`<window>.late` for a window's late records).
    pub input: String,
    /// Connector name, e.g. `file` or `discard`.
    pub connector: String,
    /// Parallel instances (default: the input's).
    pub parallelism: Option<u32>,
    /// Exchange from the input, as for transforms.
    pub partition: Option<String>,
    /// Connector options.
    #[serde(default)]
    pub options: toml::Table,
}

impl JobSpec {
    /// Parses a spec's text (after [`substitute_env`]).
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let mut field = e.span().map(|span| key_at(text, span.start)).unwrap_or_default();
            // A misspelt top-level table (`[[sinks]]`) has no span of its own: name it.
            if field.is_empty() {
                if let Some(name) = e.message().strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                    field = name.to_string();
                }
            }
            SpecError::new(field, e.message().to_string())
        })?;
        spec.expand_tables()
    }

    /// A `postgres_cdc` source whose options list `tables` stands for one source per table, named
    /// `<source>-<name>`: the source's options, each table's own (`table`, `columns`,
    /// `primary_key`, and any other to override) on top, and a slot of its own, `<slot>_<name>`.
    /// The tables share the publication (Eddy's own takes each table in turn).
    fn expand_tables(mut self) -> Result<JobSpec, SpecError> {
        let mut sources = Vec::with_capacity(self.sources.len());
        for s in std::mem::take(&mut self.sources) {
            let Some(tables) = s.options.get("tables").cloned() else {
                sources.push(s);
                continue;
            };
            let field = |at: &str| format!("source[{}].options.tables{at}", s.name);
            let example = "expected a list of tables: [{ name = \"events\", table = \"public.events\", columns = \"id BIGINT, …\", primary_key = [\"id\"] }, …]";
            if s.connector != "postgres_cdc" {
                return Err(SpecError::new(field(""), "only a postgres_cdc source reads several tables"));
            }
            let toml::Value::Array(tables) = tables else { return Err(SpecError::new(field(""), example)) };
            if tables.is_empty() {
                return Err(SpecError::new(field(""), example));
            }
            let mut base = s.options.clone();
            base.remove("tables");
            let slot = match base.get("slot") {
                None => crate::connectors::DEFAULT_SLOT.to_string(),
                Some(toml::Value::String(slot)) => slot.clone(),
                Some(_) => return Err(SpecError::new(format!("source[{}].options.slot", s.name), "expected a string")),
            };
            for (j, table) in tables.into_iter().enumerate() {
                let toml::Value::Table(mut table) = table else { return Err(SpecError::new(field(&format!("[{j}]")), example)) };
                let name = match table.remove("name") {
                    Some(toml::Value::String(name)) if crate::postgres::plain_identifier(&name) => name,
                    _ => {
                        let why =
                            format!("each table needs a `name` of lower-case letters, digits or `_`: its stream is `{}-<name>`", s.name);
                        return Err(SpecError::new(field(&format!("[{j}].name")), why));
                    }
                };
                let own = format!("{slot}_{name}");
                if !table.contains_key("slot") && !slot.contains("${worker:") && !crate::postgres::plain_identifier(&own) {
                    let why = format!("the table's slot `{own}` is over 63 bytes: give a shorter name, or a `slot` of its own");
                    return Err(SpecError::new(field(&format!("[{j}].name")), why));
                }
                let mut options = base.clone();
                options.insert("slot".into(), toml::Value::String(own));
                options.extend(table);
                sources.push(SourceSpec { name: format!("{}-{name}", s.name), options, ..s.clone() });
            }
        }
        self.sources = sources;
        Ok(self)
    }
}

/// The dotted path of the TOML key whose value starts at byte `offset`, best effort, for messages.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let table = before
        .lines()
        .rev()
        .find_map(|l| {
            let t = l.trim();
            t.starts_with('[').then(|| t.trim_matches(|c| c == '[' || c == ']').to_string())
        })
        .unwrap_or_default();
    let line = before.rsplit('\n').next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    match (table.is_empty(), key.is_empty() || line.trim_start().starts_with('[')) {
        (true, false) => key.to_string(),
        (false, false) => format!("{table}.{key}"),
        (false, true) => table,
        (true, true) => String::new(),
    }
}

/// The prefix of a reference resolved on each worker, from its own environment:
/// `${worker:NAME}` (or `${worker:NAME:-default}`). The spec keeps it as written on the way
/// through the CLI and the coordinator, so a secret given that way is stored and shown nowhere.
pub const WORKER_PREFIX: &str = "worker:";

/// Replaces `${VAR}` with the variable's value and `${VAR:-default}` with the value or the default.
/// A `${VAR}` whose variable is unset is an error naming it. `${worker:VAR}` is left as it is, for
/// the workers ([`substitute_worker_env`]).
pub fn substitute_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SpecError> {
    substitute(text, false, lookup)
}

/// Replaces each `${worker:VAR}` with the variable's value in this process's environment (or its
/// default), leaving everything else as it is.
pub fn substitute_worker_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SpecError> {
    substitute(text, true, lookup)
}

/// The names of the `${worker:NAME}` references in `text`, each once.
pub fn worker_references(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("${worker:") {
        let rest = &text[at + 2 + WORKER_PREFIX.len()..];
        let reference = &rest[..rest.find('}').unwrap_or(rest.len())];
        let name = reference.split_once(":-").map_or(reference, |(n, _)| n);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// `value` as it may stand inside a TOML basic string (`"…"`), where worker references are
/// meant to be: a quote or backslash in a password must not end the string or change the spec.
fn toml_escaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The references of one kind (the workers' or the others) replaced.
fn substitute(text: &str, workers: bool, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SpecError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| SpecError::new("", format!("unterminated `${{` near `{}`", first_line(&rest[start..]))))?;
        let inner = &after[..end];
        rest = &after[end + 1..];
        let (for_workers, reference) = match inner.strip_prefix(WORKER_PREFIX) {
            Some(r) => (true, r),
            None => (false, inner),
        };
        if for_workers != workers {
            out.push_str("${");
            out.push_str(inner);
            out.push('}');
            continue;
        }
        let (name, default) = match reference.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(SpecError::new(
                "",
                format!("bad variable reference `${{{inner}}}`: expected ${{NAME}}, ${{NAME:-default}} or ${{worker:NAME}}"),
            ));
        }
        let place = if workers { " on this worker" } else { "" };
        match (lookup(name), default) {
            (Some(v), _) if workers => out.push_str(&toml_escaped(&v)),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                let unset = format!("environment variable `{name}` is not set{place}; set it or write `${{{inner}:-default}}`");
                return Err(SpecError::new("", unset));
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "OUT").then(|| "/tmp/x".to_string())
    }

    /// `tables = [...]`: one source per table, each with its own key and slot, sharing the rest.
    #[test]
    fn a_cdc_source_over_several_tables_is_one_source_per_table() {
        let text = r#"
name = "two"
[[source]]
name = "cdc"
connector = "postgres_cdc"
[source.options]
url = "postgres://u@h/d"
slot = "ingest"
publication = "eddy_pub"
version_column = "version"
tables = [
  { name = "events", table = "public.engagement_events", columns = "id BIGINT, content_id VARCHAR", primary_key = ["id"] },
  { name = "content", table = "public.content", columns = "id VARCHAR, slug VARCHAR", primary_key = ["id"], slot = "own" },
]
[[sink]]
name = "events_out"
input = "cdc-events"
connector = "discard"
[[sink]]
name = "content_out"
input = "cdc-content"
connector = "discard"
"#;
        let spec = JobSpec::parse(text).unwrap();
        let names: Vec<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cdc-events", "cdc-content"]);
        let option = |i: usize, k: &str| spec.sources[i].options[k].as_str().unwrap().to_string();
        assert_eq!((option(0, "slot"), option(1, "slot")), ("ingest_events".into(), "own".into()));
        assert_eq!((option(0, "publication"), option(1, "version_column")), ("eddy_pub".into(), "version".into()));
        assert!(!spec.sources[0].options.contains_key("tables"));
        let plan = crate::compile(text).unwrap();
        assert_eq!(plan.operators.iter().filter(|o| matches!(o.kind, crate::plan::OperatorKind::Source { .. })).count(), 2);
        for (bad, says) in [
            ("tables = []", "expected a list of tables"),
            ("tables = [{ table = \"t\" }]", "tables[0].name"),
            ("tables = [{ name = \"Bad\" }]", "lower-case"),
        ] {
            let text = format!("name = \"x\"\n[[source]]\nname = \"cdc\"\nconnector = \"postgres_cdc\"\n[source.options]\n{bad}\n");
            let e = JobSpec::parse(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("tables = [{{ name = \"{}\" }}]", "t".repeat(60));
        let e =
            JobSpec::parse(&format!("name = \"x\"\n[[source]]\nname = \"cdc\"\nconnector = \"postgres_cdc\"\n[source.options]\n{long}\n"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("source[cdc].options.tables[0].name") && e.contains("over 63 bytes"), "{e}");
        // Two sources whose tables make one slot.
        let twice = text.replace("slot = \"own\"", "slot = \"ingest_events\"");
        let e = crate::compile(&twice).unwrap_err().to_string();
        assert!(e.contains("each source reads a slot of its own"), "{e}");
    }

    #[test]
    fn substitutes_variables_and_defaults() {
        let s = substitute_env("a=${OUT}/f b=${PORT:-9000} c=$plain", env).unwrap();
        assert_eq!(s, "a=/tmp/x/f b=9000 c=$plain");
    }

    #[test]
    fn worker_references_wait_for_the_workers() {
        let text = "url = \"postgres://u:${worker:PW}@h/${DB:-d}\" b = \"${worker:SLOTS:-4}\"";
        let sent = substitute_env(text, |_| None).unwrap();
        assert_eq!(sent, "url = \"postgres://u:${worker:PW}@h/d\" b = \"${worker:SLOTS:-4}\"");
        let run = substitute_worker_env(&sent, |n| (n == "PW").then(|| "s3cret".into())).unwrap();
        assert_eq!(run, "url = \"postgres://u:s3cret@h/d\" b = \"4\"");
        let e = substitute_worker_env(&sent, |_| None).unwrap_err();
        assert!(e.to_string().contains("`PW` is not set on this worker"), "{e}");
        assert_eq!(worker_references(&sent), ["PW", "SLOTS"]);
        // A value is a string's content, whatever it holds.
        let quoted = substitute_worker_env("p = \"${worker:PW}\"", |_| Some("a\"b\\c\n".into())).unwrap();
        assert_eq!(quoted, r#"p = "a\"b\\c\u000A""#);
        assert_eq!(toml::from_str::<toml::Table>(&quoted).unwrap()["p"].as_str(), Some("a\"b\\c\n"));
    }

    #[test]
    fn unset_variable_is_named() {
        let e = substitute_env("x = \"${MISSING}\"", env).unwrap_err();
        assert!(e.to_string().contains("`MISSING` is not set"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = JobSpec::parse("name = \"j\"\n[[source]]\nname = \"s\"\nconnector = \"generator\"\nparalelism = 2\n").unwrap_err();
        assert!(e.to_string().contains("paralelism"), "{e}");
        assert!(e.field.contains("source"), "{e:?}");
    }
}
