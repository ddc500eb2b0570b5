//! Eddy's wire contracts: the job API (CLI → coordinator), the cluster API (worker ↔ coordinator)
//! and the data exchange (worker → worker), generated from `proto/eddy.proto`.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eddy.v1");

/// Every long-lived gRPC connection between Eddy's processes (a worker's control stream to the
/// coordinator, the data exchange between workers) pings its peer this often, from both ends, even
/// when idle: a peer gone without closing its socket (a host that died, a network that split) is
/// noticed within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`], not whenever TCP gives up.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

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
