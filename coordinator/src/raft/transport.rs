//! Raft messages between coordinators over gRPC: each message travels as the bytes raft-rs encodes
//! it to (so the tree keeps one prost, for Eddy's own API). One task per peer sends its messages
//! in order, in batches; a peer that does not answer is reported unreachable to the node, and raft
//! sends again what it needs.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::Sender;
use std::time::Duration;

use eddy_proto::raft_service_client::RaftServiceClient;
use eddy_proto::raft_service_server::RaftService;
use eddy_proto::{RaftAck, RaftMessages};
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::node::{Input, Transport};

/// Sends a node's messages to its peers.
pub struct GrpcTransport {
    runtime: tokio::runtime::Handle,
    inputs: Sender<Input>,
    peers: HashMap<u64, (String, mpsc::UnboundedSender<Message>)>,
    access: eddy_proto::Access,
}

impl GrpcTransport {
    /// A transport spawning its senders on `runtime`, reporting unreachable peers to `inputs`,
    /// reaching them as `access` says.
    pub fn new(runtime: tokio::runtime::Handle, inputs: Sender<Input>, access: eddy_proto::Access) -> GrpcTransport {
        GrpcTransport { runtime, inputs, peers: HashMap::new(), access }
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, messages: Vec<Message>, addresses: &BTreeMap<u64, String>) {
        for m in messages {
            let Some(address) = addresses.get(&m.to) else { continue };
            let current = self.peers.get(&m.to).filter(|(a, tx)| a == address && !tx.is_closed());
            let tx = match current {
                Some((_, tx)) => tx.clone(),
                None => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.runtime.spawn(send_to(m.to, address.clone(), rx, self.inputs.clone(), self.access.clone()));
                    self.peers.insert(m.to, (address.clone(), tx.clone()));
                    tx
                }
            };
            let _ = tx.send(m);
        }
    }
}

/// Messages a peer is sent in one call, at most.
const BATCH: usize = 256;

async fn send_to(
    to: u64,
    address: String,
    mut messages: mpsc::UnboundedReceiver<Message>,
    inputs: Sender<Input>,
    access: eddy_proto::Access,
) {
    let endpoint = match access.endpoint(&address) {
        Ok(e) => e.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(3)),
        Err(e) => {
            tracing::warn!(to, address, error = %e, "a coordinator's address is not a URL; not sending to it");
            return;
        }
    };
    let mut client = RaftServiceClient::new(access.connect_lazy(endpoint)).max_decoding_message_size(64 << 20);
    let mut batch = Vec::new();
    while messages.recv_many(&mut batch, BATCH).await > 0 {
        let encoded = batch.drain(..).filter_map(|m| m.write_to_bytes().ok()).collect();
        if let Err(e) = client.step(RaftMessages { messages: encoded }).await {
            if let Some(reason) = eddy_proto::auth::tls_fault(&e) {
                tracing::warn!(to, address, error = %reason, "TLS to a coordinator failed: check the certificates and --tls-ca");
            } else if e.code() == tonic::Code::Unauthenticated {
                // Not a passing fault: the coordinators were given different secrets.
                tracing::warn!(to, address, error = %e.message(), "a coordinator refused this one's cluster secret");
            } else {
                debug!(to, address, error = %e, "a coordinator did not take raft messages");
            }
            let _ = inputs.send(Input::Unreachable(to));
        }
    }
}

/// Receives raft messages for this coordinator's node.
pub struct RaftServer {
    inputs: Sender<Input>,
}

impl RaftServer {
    pub fn new(inputs: Sender<Input>) -> RaftServer {
        RaftServer { inputs }
    }
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn step(&self, request: Request<RaftMessages>) -> Result<Response<RaftAck>, Status> {
        for bytes in request.into_inner().messages {
            let m = Message::parse_from_bytes(&bytes).map_err(|e| Status::invalid_argument(format!("not a raft message: {e}")))?;
            self.inputs.send(Input::Step(Box::new(m))).map_err(|_| Status::unavailable("this coordinator's raft node has stopped"))?;
        }
        Ok(Response::new(RaftAck {}))
    }
}
