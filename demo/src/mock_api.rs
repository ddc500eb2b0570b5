//! A mock of the external system the `http` sink delivers to.
//!
//! - `POST /events` (any path is accepted) with a JSON body and an `Idempotency-Key` header: the
//!   first request with a key records the body (and appends `{"key": …, "body": …, "received_at_ms": …}` to the log file,
//!   if any) and counts as `unique`; a repeat counts as a `duplicate` and is answered 200 all the
//!   same. A body that is not JSON, or a missing or empty key, is refused with 400.
//! - With `fail_every = N`, every Nth POST is answered 503 before it is looked at (`failed`).
//! - `latency` delays every POST's answer (to exercise timeouts).
//! - `GET /stats` → `{"received": POSTs, "unique": n, "duplicates": n, "failed": n, "refused": n}`.
//! - `GET /events` → every recorded body with its key, in arrival order:
//!   `[{"key": "…", "body": {…}}, …]`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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
}

/// What the mock has seen.
#[derive(Default)]
struct Seen {
    received: u64,
    unique: u64,
    duplicates: u64,
    failed: u64,
    refused: u64,
    keys: HashSet<String>,
    events: Vec<Value>,
}

struct Mock {
    config: MockConfig,
    seen: Mutex<Seen>,
    log: Option<Mutex<std::fs::File>>,
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: MockConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
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
    let mock = Arc::new(Mock { config, seen: Mutex::default(), log });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            // Stop accepting first; connections in progress end with the process.
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    // Out of file descriptors or a reset during accept: keep serving.
                    Err(e) => {
                        eprintln!("eddy-mock-api: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let mock = mock.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let mock = mock.clone();
                        async move { Ok::<_, Infallible>(mock.handle(req).await) }
                    });
                    // A client closing its connection is not our concern.
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

impl Mock {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/stats") => {
                let s = self.seen();
                reply(
                    StatusCode::OK,
                    json!({"received": s.received, "unique": s.unique, "duplicates": s.duplicates, "failed": s.failed, "refused": s.refused}),
                )
            }
            (&Method::GET, "/events") => reply(StatusCode::OK, Value::Array(self.seen().events.clone())),
            (&Method::POST, _) => self.post(req).await,
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "try POST /events, GET /stats or GET /events"})),
        }
    }

    async fn post(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        {
            let mut s = self.seen();
            s.received += 1;
            if s.received.checked_rem(self.config.fail_every) == Some(0) {
                s.failed += 1;
                return reply(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "failing on purpose (--fail-every)"}));
            }
        }
        let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return self.refuse(&format!("reading the body: {e}")),
        };
        if key.is_empty() {
            return self.refuse("the Idempotency-Key header is missing or empty");
        }
        let body: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return self.refuse(&format!("the body is not JSON: {e}")),
        };
        let received_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let event = json!({"key": key, "body": body, "received_at_ms": received_at_ms});
        let first = {
            let mut s = self.seen();
            if s.keys.insert(key) {
                s.unique += 1;
                s.events.push(event.clone());
                true
            } else {
                s.duplicates += 1;
                false
            }
        };
        if first {
            if let Some(log) = &self.log {
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

    fn refuse(&self, why: &str) -> Response<Full<Bytes>> {
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
        let config = MockConfig { fail_every: 4, latency: Duration::ZERO, log: Some(log.clone()) };
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
        assert_eq!(stats, json!({"received": 6, "unique": 2, "duplicates": 1, "failed": 1, "refused": 2}));
        let (_, events) = http(addr, "GET", "/events", None, "").await;
        let without_time = |mut v: serde_json::Value| {
            v.as_object_mut().map(|o| o.remove("received_at_ms"));
            v
        };
        let events: Vec<_> = events.as_array().unwrap().iter().cloned().map(without_time).collect();
        assert_eq!(events, [json!({"key": "1:1", "body": {"id": 1}}), json!({"key": "2:1", "body": {"id": 2}})]);
        let logged = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        let logged: Vec<_> = logged.lines().map(|l| without_time(serde_json::from_str(l).unwrap())).collect();
        assert_eq!(logged, events);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
