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
