//! What a job reaches beyond the worker that runs it: the local files it reads or writes and the
//! endpoints it connects to, each with the spec field naming it. A worker checks them against what its
//! own configuration allows before it runs a task of the job.

use crate::connectors::{SinkConnector, SourceConnector};
use crate::plan::{OperatorKind, Plan};

/// Files and endpoints a plan names, with the spec field naming each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reach {
    /// Paths of files read or written (file sources and sinks, dead letters).
    pub files: Vec<(String, String)>,
    /// What is connected to, as written: for the worker to read with its clients' own parsers,
    /// so that the host it checks is the host they connect to.
    pub endpoints: Vec<(String, Endpoint)>,
}

/// One thing a job connects to, as its spec gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An HTTP, Redis or ClickHouse URL.
    Url(String),
    /// A PostgreSQL connection string (a URL or `key=value` pairs; may name several hosts).
    Postgres(String),
    /// A Kafka bootstrap list, `host:port[,host:port…]`.
    Brokers(String),
}

impl Reach {
    fn file(&mut self, field: String, path: &str) {
        self.files.push((field, path.to_string()));
    }

    fn dead_letters(&mut self, at: &str, path: &Option<String>) {
        if let Some(path) = path {
            self.file(format!("{at}.dead_letter_path"), path);
        }
    }

    fn endpoint(&mut self, field: String, endpoint: Endpoint) {
        self.endpoints.push((field, endpoint));
    }
}

impl Plan {
    /// The files and hosts this plan reaches.
    pub fn reach(&self) -> Reach {
        let mut r = Reach::default();
        for op in &self.operators {
            let at = |kind: &str| format!("{kind}[{}]", op.name);
            match &op.kind {
                OperatorKind::Source { connector, .. } => {
                    let at = at("source");
                    match connector {
                        SourceConnector::File(o) => r.file(format!("{at}.options.path"), &o.path),
                        SourceConnector::PostgresCdc(o) => r.endpoint(format!("{at}.options.url"), Endpoint::Postgres(o.url.clone())),
                        SourceConnector::Kafka(o) => {
                            r.endpoint(format!("{at}.options.brokers"), Endpoint::Brokers(o.brokers.clone()));
                            r.dead_letters(&format!("{at}.options"), &o.dead_letter_path);
                        }
                        SourceConnector::Generator(_) => {}
                    }
                }
                OperatorKind::Transform { dead_letter_path, .. } => r.dead_letters(&at("transform"), dead_letter_path),
                OperatorKind::Window(w) => r.dead_letters(&at("window"), &w.dead_letter_path),
                OperatorKind::Lookup { options, .. } => {
                    r.endpoint(format!("{}.options.url", at("lookup")), Endpoint::Postgres(options.url.clone()))
                }
                OperatorKind::Sink { connector } => {
                    let at = format!("{}.options", at("sink"));
                    match connector {
                        SinkConnector::File(o) => r.file(format!("{at}.path"), &o.path),
                        SinkConnector::Kafka(o) => r.endpoint(format!("{at}.brokers"), Endpoint::Brokers(o.brokers.clone())),
                        SinkConnector::Redis(o) => r.endpoint(format!("{at}.url"), Endpoint::Url(o.url.clone())),
                        SinkConnector::ClickHouse(o) => {
                            r.endpoint(format!("{at}.url"), Endpoint::Url(o.url.clone()));
                            r.dead_letters(&at, &o.dead_letter_path);
                        }
                        SinkConnector::Http(o) => {
                            r.endpoint(format!("{at}.url"), Endpoint::Url(o.url.clone()));
                            r.dead_letters(&at, &o.dead_letter_path);
                        }
                        SinkConnector::Discard => {}
                    }
                }
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_and_host_a_job_names_is_listed_with_its_field() {
        let spec = r#"
name = "reach"
[[source]]
name = "events"
connector = "kafka"
options = { brokers = "k1:9092, [::1]:9093", topic = "t", group_id = "g", format = "json", columns = "id BIGINT", bad_records = "dead-letter", dead_letter_path = "/data/bad.jsonl" }
[[lookup]]
name = "dims"
input = "events"
connector = "postgres"
on = "id"
options = { url = "postgres://u:pw@db.internal:5432/app", table = "dims", key = "id", columns = "name VARCHAR" }
[[sink]]
name = "out"
input = "dims"
connector = "file"
options = { path = "/data/out.jsonl" }
[[sink]]
name = "api"
input = "dims"
connector = "http"
options = { url = "https://user:secret@api.example.com/events", idempotency_key = ["id"] }
"#;
        let reach = crate::compile(spec).unwrap_or_else(|e| panic!("{e}")).reach();
        let pairs = |v: &[(String, String)]| v.iter().map(|(f, x)| format!("{f}={x}")).collect::<Vec<_>>();
        assert_eq!(
            pairs(&reach.files),
            ["source[events].options.dead_letter_path=/data/bad.jsonl", "sink[out].options.path=/data/out.jsonl"]
        );
        assert_eq!(
            reach.endpoints,
            [
                ("source[events].options.brokers".to_string(), Endpoint::Brokers("k1:9092, [::1]:9093".into())),
                ("lookup[dims].options.url".to_string(), Endpoint::Postgres("postgres://u:pw@db.internal:5432/app".into())),
                ("sink[api].options.url".to_string(), Endpoint::Url("https://user:secret@api.example.com/events".into())),
            ]
        );
    }
}
