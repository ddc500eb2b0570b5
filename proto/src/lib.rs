//! Eddy's wire contracts: the job API (CLI → coordinator), the cluster API (worker ↔ coordinator)
//! and the data exchange (worker → worker), generated from `proto/eddy.proto`.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eddy.v1");

pub mod auth;
pub mod layout;
pub mod metrics;
pub mod storage;

pub use auth::{Access, Authed, Credentials, Guard, Secret, Tls};

/// Every long-lived gRPC connection between Eddy's processes (a worker's control stream to the
/// coordinator, the data exchange between workers) pings its peer this often, from both ends, even
/// when idle: a peer gone without closing its socket (a host that died, a network that split) is
/// noticed within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`], not whenever TCP gives up.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a worker's tasks run on without word from a leading coordinator (its control stream
/// broke, or the coordinator went quiet): long enough to ride out a coordinator failover, which
/// a new leader follows by adopting the running tasks. Shorter than the coordinator's heartbeat
/// timeout (10 s by default), so that a worker cut off stops its tasks before the coordinator
/// declares it lost and runs them elsewhere.
pub const WORKER_LEASE: std::time::Duration = std::time::Duration::from_secs(8);

/// A gRPC server for one of Eddy's processes: no Nagle delay, and its peers pinged.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// `endpoint`, pinging the server it connects to (also while idle).
pub fn with_keepalive(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint.http2_keep_alive_interval(KEEPALIVE_INTERVAL).keep_alive_timeout(KEEPALIVE_TIMEOUT).keep_alive_while_idle(true)
}

/// The addresses in a comma-separated list (`--coordinator a:1,b:2`), blanks left out.
pub fn address_list(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect()
}

/// A connection to `address` (`host:port` or a URL), pinging its server, over TLS when `access`
/// has it and presenting its secret on every call; the error says why not.
pub async fn connect(address: &str, timeout: std::time::Duration, access: &Access) -> Result<Authed, String> {
    let endpoint = access.endpoint(address)?;
    let channel = with_keepalive(endpoint.connect_timeout(timeout)).connect().await.map_err(|e| unreachable_because(&e))?;
    Ok(auth::authed(channel, &access.credentials()))
}

/// "unreachable", with the TLS reason when the connection failed in its handshake.
fn unreachable_because(e: &tonic::transport::Error) -> String {
    match auth::tls_fault(e) {
        Some(reason) => format!("unreachable (TLS: {reason})"),
        None => "unreachable".to_string(),
    }
}

/// A connection to the leading coordinator, found from `addresses` (any of a cluster's
/// coordinators, `host:port` or a URL): each is asked in turn which coordinator leads, and the
/// leader's address (which may be none of those given) is connected to. A single coordinator
/// always leads. The error lists what each address answered.
pub async fn connect_leader(
    addresses: &[String],
    connect_timeout: std::time::Duration,
    access: &Access,
) -> Result<(String, Authed), String> {
    let mut answers = Vec::new();
    for address in addresses {
        let channel = match connect(address, connect_timeout, access).await {
            Ok(c) => c,
            Err(e) => {
                answers.push(format!("{address}: {e}"));
                continue;
            }
        };
        let view = match job_service_client::JobServiceClient::new(channel.clone()).coordinators(CoordinatorsRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                answers.push(format!("{address}: {}", s.message()));
                continue;
            }
        };
        let answered_by_leader = view.coordinators.iter().any(|c| c.id == view.answered_by && c.role == "leader");
        if !view.replicated || answered_by_leader {
            return Ok((address.clone(), channel));
        }
        if view.leader_address.is_empty() {
            answers.push(format!("{address}: knows no leader"));
            continue;
        }
        match connect(&view.leader_address, connect_timeout, access).await {
            Ok(c) => return Ok((view.leader_address, c)),
            Err(e) => answers.push(format!("{address}: the leader is at {}, which is {e}", view.leader_address)),
        }
    }
    Err(answers.join("; "))
}
