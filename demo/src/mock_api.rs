//! A mock of the external system the `http` sink delivers to.
//!
//! - `POST /events` (any path is accepted) with a JSON body and an `Idempotency-Key` header: the
//!   first request with a key records the body (and appends `{"key": …, "body": …, "received_at_ms": …}` to the log file,
//!   if any) and counts as `unique`; a repeat counts as a `duplicate` and is answered 200 all the
//!   same. A repeat whose body differs from the first one's also counts as a `conflict` (a sender
//!   that reused a key for another payload, which deduplication would hide). A body that is not
//!   JSON, or a missing or empty key, is refused with 400.
//! - With `resume`, the events already in the log file are loaded first, as if received again: a
//!   stand-in stopped and started on the same log (an outage of the external system) keeps what it
//!   had received.
//! - With `fail_every = N`, every Nth POST is answered 503 before it is looked at (`failed`).
//! - `latency` delays every POST's answer (to exercise timeouts).
//! - With `password`, a POST must carry it in HTTP basic auth (any user name; a sink sends what
//!   its URL's `user:password@` holds), else it is answered 401 (`unauthorized`).
//! - `GET /stats` → `{"received": POSTs, "unique": n, "duplicates": n, "conflicts": n, "failed": n,
//!   "refused": n}` (`unique` includes the events loaded with `resume`; the rest count this run).
//! - `GET /events` → every recorded body with its key, in arrival order:
//!   `[{"key": "…", "body": {…}}, …]`.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// How the mock behaves.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Answer every Nth POST with 503 (0: never).
    pub fail_every: u64,
    /// Delay before answering each POST.
    pub latency: Duration,
    /// File to append each first-seen event to, as a JSON line.
    pub log: Option<PathBuf>,
    /// Load the events already in `log` before serving.
    pub resume: bool,
    /// The password every POST must present (basic auth), if any.
    pub password: Option<String>,
}

/// What the mock has seen.
#[derive(Default)]
struct Seen {
    received: u64,
    unique: u64,
    duplicates: u64,
    conflicts: u64,
    failed: u64,
    refused: u64,
    unauthorized: u64,
    /// Each key's first body.
    keys: HashMap<String, Value>,
    events: Vec<Value>,
}

impl Seen {
    /// Records `body` under `key`: true when the key is new.
    fn record(&mut self, key: String, body: &Value, event: Value) -> bool {
        match self.keys.get(&key) {
            Some(first) => {
                self.duplicates += 1;
                self.conflicts += u64::from(first != body);
                false
            }
            None => {
                self.keys.insert(key, body.clone());
                self.unique += 1;
                self.events.push(event);
                true
            }
        }
    }
}

/// The events of an earlier run's log (`{"key", "body", …}` per line), as first seen.
fn load_log(path: &std::path::Path) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seen),
        Err(e) => anyhow::bail!("reading the log file {}: {e}", path.display()),
    };
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        // A line cut short by a kill during its write is the only one that may be broken: the last.
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            anyhow::ensure!(n + 1 == text.lines().count(), "{}: line {} is not JSON", path.display(), n + 1);
            continue;
        };
        let key = event["key"].as_str().unwrap_or_default().to_string();
        let body = event["body"].clone();
        seen.record(key, &body, event);
    }
    seen.duplicates = 0;
    seen.conflicts = 0;
    Ok(seen)
}

struct Mock {
    config: MockConfig,
    seen: Mutex<Seen>,
    log: Option<Mutex<std::fs::File>>,
}

/// Serves on `listener` until `shutdown` resolves (requests in progress are answered first).
pub async fn run(listener: TcpListener, config: MockConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let log = match &config.log {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("opening the log file {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let seen = match (&config.log, config.resume) {
        (Some(path), true) => load_log(path)?,
        _ => Seen::default(),
    };
    let mock = Arc::new(Mock { config, seen: Mutex::new(seen), log });
    // Any path takes events; only GETs of these two report.
    let app = Router::new()
        .route("/stats", get(stats).post(post).fallback(other))
        .route("/events", get(events).post(post).fallback(other))
        .fallback(other)
        .with_state(mock);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn stats(State(mock): State<Arc<Mock>>) -> Response {
    let s = mock.seen();
    reply(
        StatusCode::OK,
        json!({
            "received": s.received, "unique": s.unique, "duplicates": s.duplicates, "conflicts": s.conflicts,
            "failed": s.failed, "refused": s.refused, "unauthorized": s.unauthorized,
        }),
    )
}

/// The password of a request's basic auth, if it has one.
fn basic_auth_password(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let encoded = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).ok()?).ok()?;
    decoded.split_once(':').map(|(_, password)| password.to_string())
}

async fn events(State(mock): State<Arc<Mock>>) -> Response {
    reply(StatusCode::OK, Value::Array(mock.seen().events.clone()))
}

async fn other(state: State<Arc<Mock>>, req: Request) -> Response {
    match *req.method() {
        Method::POST => post(state, req).await,
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "try POST /events, GET /stats or GET /events"})),
    }
}

async fn post(State(mock): State<Arc<Mock>>, req: Request) -> Response {
    if !mock.config.latency.is_zero() {
        tokio::time::sleep(mock.config.latency).await;
    }
    {
        let mut s = mock.seen();
        s.received += 1;
        if s.received.checked_rem(mock.config.fail_every) == Some(0) {
            s.failed += 1;
            return reply(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "failing on purpose (--fail-every)"}));
        }
    }
    if let Some(password) = &mock.config.password {
        if basic_auth_password(req.headers()).as_deref() != Some(password.as_str()) {
            mock.seen().unauthorized += 1;
            return reply(StatusCode::UNAUTHORIZED, json!({"error": "this API needs its password (basic auth)"}));
        }
    }
    let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = match axum::body::to_bytes(Body::new(req.into_body()), MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(e) => return mock.refuse(&format!("reading the body: {e}")),
    };
    if key.is_empty() {
        return mock.refuse("the Idempotency-Key header is missing or empty");
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return mock.refuse(&format!("the body is not JSON: {e}")),
    };
    let received_at_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
    let event = json!({"key": key, "body": body, "received_at_ms": received_at_ms});
    let first = mock.seen().record(key, &body, event.clone());
    if first {
        if let Some(log) = &mock.log {
            let mut line = event.to_string();
            line.push('\n');
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = file.write_all(line.as_bytes()) {
                eprintln!("eddy-mock-api: writing the log: {e}");
            }
        }
    }
    reply(StatusCode::OK, json!({"status": if first { "ok" } else { "duplicate" }}))
}

impl Mock {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, why: &str) -> Response {
        self.seen().refused += 1;
        reply(StatusCode::BAD_REQUEST, json!({"error": why}))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One HTTP/1.1 exchange over a fresh connection: (status, body).
    async fn http(addr: std::net::SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let key = key.map(|k| format!("Idempotency-Key: {k}\r\n")).unwrap_or_default();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n{key}Content-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap())
    }

    #[tokio::test]
    async fn deduplicates_by_key_fails_on_purpose_and_reports() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = std::env::temp_dir().join(format!("eddy-mock-api-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let config = MockConfig { fail_every: 4, latency: Duration::ZERO, log: Some(log.clone()), resume: false, password: None };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(listener, config, async {
            let _ = stopped.await;
        }));

        assert_eq!(http(addr, "POST", "/events", Some("1:1"), r#"{"id":1}"#).await.0, 200);
        assert_eq!(http(addr, "POST", "/events", Some("2:1"), r#"{"id":2}"#).await.0, 200);
        let (status, body) = http(addr, "POST", "/events", Some("1:1"), r#"{"id":1}"#).await;
        assert_eq!((status, body), (200, json!({"status": "duplicate"})));
        assert_eq!(http(addr, "POST", "/events", Some("3:1"), r#"{"id":3}"#).await.0, 503);
        assert_eq!(http(addr, "POST", "/events", None, r#"{"id":4}"#).await.0, 400);
        assert_eq!(http(addr, "POST", "/events", Some("5:1"), "not json").await.0, 400);
        assert_eq!(http(addr, "GET", "/nope", None, "").await.0, 404);

        let (_, stats) = http(addr, "GET", "/stats", None, "").await;
        assert_eq!(
            stats,
            json!({"received": 6, "unique": 2, "duplicates": 1, "conflicts": 0, "failed": 1, "refused": 2, "unauthorized": 0})
        );
        let (_, events) = http(addr, "GET", "/events", None, "").await;
        let without_time = |mut v: serde_json::Value| {
            v.as_object_mut().map(|o| o.remove("received_at_ms"));
            v
        };
        let events: Vec<_> = events.as_array().unwrap().iter().cloned().map(without_time).collect();
        assert_eq!(events, [json!({"key": "1:1", "body": {"id": 1}}), json!({"key": "2:1", "body": {"id": 2}})]);
        let logged = std::fs::read_to_string(&log).unwrap();
        let logged: Vec<_> = logged.lines().map(|l| without_time(serde_json::from_str(l).unwrap())).collect();
        assert_eq!(logged, events);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        // Started again on the same log with `resume`: what was received is still there, and a
        // repeat of a known key with another body is a conflict.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = MockConfig { fail_every: 0, latency: Duration::ZERO, log: Some(log.clone()), resume: true, password: None };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(listener, config, async {
            let _ = stopped.await;
        }));
        assert_eq!(http(addr, "POST", "/events", Some("1:1"), r#"{"id":1}"#).await.0, 200);
        assert_eq!(http(addr, "POST", "/events", Some("2:1"), r#"{"id":22}"#).await.0, 200);
        assert_eq!(http(addr, "POST", "/events", Some("6:1"), r#"{"id":6}"#).await.0, 200);
        let (_, stats) = http(addr, "GET", "/stats", None, "").await;
        assert_eq!(
            stats,
            json!({"received": 3, "unique": 3, "duplicates": 2, "conflicts": 1, "failed": 0, "refused": 0, "unauthorized": 0})
        );
        let (_, events) = http(addr, "GET", "/events", None, "").await;
        let keys: Vec<_> = events.as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_string()).collect();
        assert_eq!(keys, ["1:1", "2:1", "6:1"]);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let _ = std::fs::remove_file(&log);
    }
}
