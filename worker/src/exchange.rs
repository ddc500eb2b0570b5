//! Exchanges: how batches reach the next task. Within a worker a task's inbox is one bounded channel
//! per input channel; across workers, one gRPC stream per (sender, receiver) pair feeds the
//! receiver's input, and HTTP/2 flow control stops the sender while that input is full. Either way
//! a slow consumer (or an input blocked for a barrier alignment) backpressures its producers, and
//! memory stays bounded.
//!
//! A [`Router`] sits at the end of every chain that is not a sink: it partitions rows per edge
//! (forward, rebalance, hash by key group, broadcast, global) into per-receiver buffers bounded by
//! rows and bytes, and flushes them when full, before control messages, or after a short linger.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eddy_jobs::plan::{Partition, Plan, Port};
use eddy_jobs::TaskId;
use eddy_proto::data_service_client::DataServiceClient;
use eddy_proto::data_service_server::DataService;
use eddy_proto::{Access, Authed, ChannelHeader, ExchangeAck, ExchangeFrame};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::{row_bytes, Batch, Message};
use crate::codec;
use crate::error::{Result, TaskError};
use crate::keys::{hash_key, key_group, subtask_for};
use crate::operator::TaskMetrics;

/// Most rows a batch carries before it is sent.
pub const BATCH_ROWS: usize = 1024;
/// Most bytes (estimated) a batch carries before it is sent.
pub const BATCH_BYTES: usize = 256 * 1024;
/// How long a partly filled batch may wait for more rows.
pub const LINGER: Duration = Duration::from_millis(10);
/// Messages (batches) a task's input channels hold together before their senders wait; each
/// input gets its share, and at least two.
const INBOX_CAPACITY: usize = 16;
/// Frames buffered per outgoing remote stream.
const REMOTE_BUFFER: usize = 4;
/// HTTP/2 flow-control window of one incoming exchange stream: what it may buffer while its input
/// is full or blocked.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window of one connection from another worker, shared by its streams: the
/// largest HTTP/2 allows, so that streams blocked for a barrier alignment (up to 2047 of them
/// between two workers, each holding at most its own window) never use it up and stall the other
/// streams on the connection, which would hold back the very barriers that would unblock them.
/// Memory stays bounded by the streams' own windows.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The capacity of each input channel of a task with `inputs` inputs.
fn inbox_capacity(inputs: usize) -> usize {
    (INBOX_CAPACITY / inputs.max(1)).max(2)
}

/// A message for a task, tagged with the input channel it came on.
#[derive(Debug)]
pub struct Delivery {
    /// Index into the task's input channels (`Plan::inputs`).
    pub input: usize,
    /// What arrived.
    pub msg: Message,
}

/// Identifies an inbox: one task of one job attempt.
pub type InboxKey = (String, u64, TaskId);

struct Slot {
    tx: mpsc::Sender<Delivery>,
    rx: Option<mpsc::Receiver<Delivery>>,
}

#[derive(Default)]
struct InboxTable {
    /// One bounded channel per (inbox, input channel): a task can stop reading one input (barrier
    /// alignment) and that input's senders wait, while its other inputs flow.
    slots: HashMap<(InboxKey, usize), Slot>,
    /// Newest attempt seen per job: older attempts are fenced off.
    attempts: HashMap<String, u64>,
    /// How many inputs each inbox has, as the first sender or the task said.
    inputs: HashMap<InboxKey, usize>,
    /// The tasks the coordinator deployed here, per job attempt: only their inboxes exist.
    placed: HashMap<(String, u64), HashSet<TaskId>>,
    /// Inputs a stream from another worker feeds: one stream each.
    streamed: HashSet<(InboxKey, usize)>,
}

/// Why an inbox refuses a sender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("job attempt superseded")]
    Superseded,
    #[error("input {input} is out of range: task {task} has {inputs} inputs")]
    NoSuchInput { task: TaskId, input: usize, inputs: usize },
    #[error("task {task} has {known} inputs, but a sender's plan says {said}: the plans differ")]
    PlansDiffer { task: TaskId, known: usize, said: usize },
    #[error("the inputs of task {task} are already taken: the task runs twice in one attempt")]
    AlreadyTaken { task: TaskId },
    #[error("task {task} of this job attempt is not deployed on this worker")]
    NotPlacedHere { task: TaskId },
    #[error("input {input} of task {task} is already fed by another stream")]
    InputStreamed { task: TaskId, input: usize },
}

/// The inboxes of this worker's tasks, created by whichever comes first: the task, or a sender,
/// and only for the tasks deployed here.
#[derive(Clone, Default)]
pub struct Inboxes {
    inner: Arc<Mutex<InboxTable>>,
    /// Woken when tasks are deployed here (a stream may arrive before its task's deployment).
    deployed: Arc<tokio::sync::Notify>,
}

impl Inboxes {
    fn table(&self) -> std::sync::MutexGuard<'_, InboxTable> {
        // A panic while holding this lock leaves plain maps behind, still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sender into input `input` of the inbox of `key`, a task with `inputs` inputs.
    pub fn sender(&self, key: &InboxKey, input: usize, inputs: usize) -> std::result::Result<mpsc::Sender<Delivery>, Refused> {
        Self::sender_in(&mut self.table(), key, input, inputs)
    }

    fn sender_in(t: &mut InboxTable, key: &InboxKey, input: usize, inputs: usize) -> std::result::Result<mpsc::Sender<Delivery>, Refused> {
        if t.attempts.get(&key.0).is_some_and(|&a| a > key.1) {
            return Err(Refused::Superseded);
        }
        if !t.placed.get(&(key.0.clone(), key.1)).is_some_and(|tasks| tasks.contains(&key.2)) {
            return Err(Refused::NotPlacedHere { task: key.2 });
        }
        let known = *t.inputs.entry(key.clone()).or_insert(inputs);
        if known != inputs {
            return Err(Refused::PlansDiffer { task: key.2, known, said: inputs });
        }
        if input >= inputs {
            return Err(Refused::NoSuchInput { task: key.2, input, inputs });
        }
        Ok(t.slots
            .entry((key.clone(), input))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(inbox_capacity(inputs));
                Slot { tx, rx: Some(rx) }
            })
            .tx
            .clone())
    }

    /// Takes the receiving ends of `key`'s `inputs` input channels (once).
    pub fn receivers(&self, key: &InboxKey, inputs: usize) -> std::result::Result<Inputs, Refused> {
        for input in 0..inputs {
            self.sender(key, input, inputs)?;
        }
        let mut t = self.table();
        // All or none: a refusal leaves every receiver where it was.
        if (0..inputs).any(|i| t.slots.get(&(key.clone(), i)).is_none_or(|s| s.rx.is_none())) {
            return Err(Refused::AlreadyTaken { task: key.2 });
        }
        let receivers = (0..inputs).filter_map(|i| t.slots.get_mut(&(key.clone(), i)).and_then(|s| s.rx.take())).collect();
        Ok(Inputs { receivers, next: 0 })
    }

    /// A sender into input `input` of `key`'s inbox for a stream from another worker: like
    /// [`Inboxes::sender`], and only one stream per input, so that no second stream can slip
    /// rows or control messages between the real sender's.
    pub fn stream_sender(&self, key: &InboxKey, input: usize, inputs: usize) -> std::result::Result<mpsc::Sender<Delivery>, Refused> {
        let mut t = self.table();
        if t.streamed.contains(&(key.clone(), input)) {
            return Err(Refused::InputStreamed { task: key.2, input });
        }
        let tx = Self::sender_in(&mut t, key, input, inputs)?;
        t.streamed.insert((key.clone(), input));
        Ok(tx)
    }

    /// Like [`Inboxes::stream_sender`], waiting up to `patience` for the task to be deployed here
    /// (its upstream may have been deployed, and started sending, first).
    pub async fn stream_sender_when_placed(
        &self,
        key: &InboxKey,
        input: usize,
        inputs: usize,
        patience: Duration,
    ) -> std::result::Result<mpsc::Sender<Delivery>, Refused> {
        let deadline = Instant::now() + patience;
        loop {
            // Listening before looking, so that a deployment in between is not missed.
            let deployed = self.deployed.notified();
            match self.stream_sender(key, input, inputs) {
                Err(Refused::NotPlacedHere { .. }) if Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, deployed).await;
                }
                result => return result,
            }
        }
    }

    /// Records that `attempt` is the newest of `job`, dropping inboxes of older attempts, and
    /// that `tasks` of it are deployed here.
    pub fn fence(&self, job: &str, attempt: u64, tasks: impl IntoIterator<Item = TaskId>) {
        let mut t = self.table();
        t.attempts.insert(job.to_string(), attempt);
        t.slots.retain(|(k, _), _| k.0 != job || k.1 >= attempt);
        t.inputs.retain(|k, _| k.0 != job || k.1 >= attempt);
        t.streamed.retain(|(k, _)| k.0 != job || k.1 >= attempt);
        t.placed.retain(|(j, a), _| j != job || *a >= attempt);
        t.placed.entry((job.to_string(), attempt)).or_default().extend(tasks);
        drop(t);
        self.deployed.notify_waiters();
    }

    /// Drops every inbox of a job attempt.
    pub fn remove(&self, job: &str, attempt: u64) {
        let mut t = self.table();
        t.slots.retain(|(k, _), _| k.0 != job || k.1 != attempt);
        t.inputs.retain(|k, _| k.0 != job || k.1 != attempt);
        t.streamed.retain(|(k, _)| k.0 != job || k.1 != attempt);
        t.placed.remove(&(job.to_string(), attempt));
    }
}

/// A task's input channels, read in turn. An input can be left unread for a while (barrier
/// alignment blocks the inputs whose barrier has arrived): its channel fills and its senders
/// wait, so nothing piles up in the task.
pub struct Inputs {
    receivers: Vec<mpsc::Receiver<Delivery>>,
    /// Where the next read starts, so that no input starves the others.
    next: usize,
}

impl Inputs {
    /// The next message of an input `blocked` does not name; `None` once every input is closed.
    pub async fn recv(&mut self, blocked: impl Fn(usize) -> bool) -> Option<Delivery> {
        std::future::poll_fn(|cx| {
            let n = self.receivers.len();
            let mut open = false;
            for k in 0..n {
                let i = (self.next + k) % n;
                if blocked(i) {
                    open = true;
                    continue;
                }
                match self.receivers[i].poll_recv(cx) {
                    std::task::Poll::Ready(Some(d)) => {
                        self.next = (i + 1) % n;
                        return std::task::Poll::Ready(Some(d));
                    }
                    std::task::Poll::Ready(None) => {}
                    std::task::Poll::Pending => open = true,
                }
            }
            if open {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(None)
            }
        })
        .await
    }
}

/// gRPC clients to other workers' data services, one connection per address.
#[derive(Clone, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Authed>>>,
    access: Access,
}

impl Peers {
    /// Clients reaching other workers as `access` says (TLS, the secret presented).
    pub fn new(access: Access) -> Peers {
        Peers { channels: Arc::default(), access }
    }

    fn client(&self, address: &str) -> Result<DataServiceClient<Authed>> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(address) {
            return Ok(DataServiceClient::new(c.clone()));
        }
        let endpoint = self
            .access
            .endpoint(address)
            .map_err(|e| TaskError::internal(format!("bad worker address `{address}`: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        let channel = self.access.connect_lazy(endpoint);
        map.insert(address.to_string(), channel.clone());
        Ok(DataServiceClient::new(channel))
    }
}

/// What the exchange needs to know of the task whose outputs it opens.
pub struct Wiring<'a> {
    pub job_id: &'a str,
    /// The job's attempt: a channel of an older attempt is refused.
    pub attempt: u64,
    /// The sending task.
    pub task: TaskId,
    pub plan: &'a Plan,
    /// Data address of every task of the job.
    pub placement: &'a HashMap<TaskId, String>,
    /// This worker's data address: receivers placed here are reached through `inboxes`.
    pub local_address: &'a str,
    pub inboxes: &'a Inboxes,
    pub peers: &'a Peers,
    /// The sending task's figures: time spent waiting on a full receiver is its backpressure.
    pub metrics: &'a Arc<TaskMetrics>,
}

/// The sending end of one channel to one receiving task.
pub enum Output {
    /// Same worker: straight into the receiver's inbox.
    Local { tx: mpsc::Sender<Delivery>, input: usize },
    /// Another worker: frames over a gRPC stream.
    Remote { tx: mpsc::Sender<ExchangeFrame>, address: String },
}

impl Output {
    /// Opens a channel from the task of `ctx` to `receiver` at `address`, whose input `input` it is.
    pub fn open(ctx: &Wiring, receiver: TaskId, input: usize, address: &str) -> Result<Output> {
        let (job, attempt) = (ctx.job_id, ctx.attempt);
        let inputs = ctx.plan.inputs(receiver).len();
        if address == ctx.local_address {
            let tx =
                ctx.inboxes.sender(&(job.to_string(), attempt, receiver), input, inputs).map_err(|e| TaskError::internal(e.to_string()))?;
            return Ok(Output::Local { tx, input });
        }
        let mut client = ctx.peers.client(address)?;
        let (tx, rx) = mpsc::channel(REMOTE_BUFFER);
        let header =
            ChannelHeader { job_id: job.to_string(), attempt, task_id: receiver.to_string(), input: input as u32, inputs: inputs as u32 };
        let first = ExchangeFrame { header: Some(header), payload: Vec::new() };
        let frames = tokio_stream::once(first).chain(ReceiverStream::new(rx));
        let target = address.to_string();
        tokio::spawn(async move {
            // When the stream fails, dropping `rx` makes the next send fail with a clear error.
            if let Err(e) = client.exchange(frames).await {
                tracing::warn!(address = %target, error = %e, "exchange stream to worker ended");
            }
        });
        Ok(Output::Remote { tx, address: address.to_string() })
    }

    /// Sends one message, waiting while the receiver is full; the wait counts as the sender's
    /// backpressure.
    pub async fn send(&self, msg: Message, waited: &TaskMetrics) -> Result<()> {
        match self {
            Output::Local { tx, input } => send_counting(tx, Delivery { input: *input, msg }, waited)
                .await
                .map_err(|()| TaskError::internal("downstream task is gone")),
            Output::Remote { tx, address } => {
                let frame = ExchangeFrame { header: None, payload: codec::encode(&msg) };
                send_counting(tx, frame, waited)
                    .await
                    .map_err(|()| TaskError::internal(format!("lost the data connection to worker {address}")))
            }
        }
    }
}

/// Sends on a bounded channel; when it is full, waits for room, the wait counted as backpressure.
/// Errs when the receiver is gone.
async fn send_counting<T>(tx: &mpsc::Sender<T>, item: T, waited: &TaskMetrics) -> std::result::Result<(), ()> {
    match tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed(_)) => Err(()),
        Err(TrySendError::Full(item)) => {
            let began = waited.wait_begins();
            let sent = tx.send(item).await.map_err(|_| ());
            waited.wait_ends(began);
            sent
        }
    }
}

struct EdgeOutputs {
    port: Port,
    partition: Partition,
    outputs: Vec<Output>,
    buffers: Vec<Batch>,
    buffer_bytes: Vec<usize>,
    next: usize,
    metrics: Arc<TaskMetrics>,
}

/// Routes a chain's output to the tasks downstream.
pub struct Router {
    edges: Vec<EdgeOutputs>,
    max_parallelism: u32,
    /// When the oldest buffered row arrived, if any is buffered.
    pending_since: Option<Instant>,
}

impl Router {
    /// Opens the outputs of the task of `ctx` for every edge leaving its vertex.
    pub fn open(ctx: &Wiring) -> Result<Router> {
        let (plan, task) = (ctx.plan, ctx.task);
        let mut edges = Vec::new();
        for (i, edge) in plan.edges.iter().enumerate().filter(|(_, e)| e.from == task.vertex) {
            let mut outputs = Vec::new();
            for (receiver, input) in plan.outputs(task, i) {
                let address =
                    ctx.placement.get(&receiver).ok_or_else(|| TaskError::internal(format!("no placement for task {receiver}")))?;
                outputs.push(Output::open(ctx, receiver, input, address)?);
            }
            let n = outputs.len();
            edges.push(EdgeOutputs {
                port: edge.port,
                partition: edge.partition.clone(),
                outputs,
                buffers: (0..n).map(|_| Batch::default()).collect(),
                buffer_bytes: vec![0; n],
                next: task.subtask as usize,
                metrics: ctx.metrics.clone(),
            });
        }
        Ok(Router { edges, max_parallelism: plan.max_parallelism, pending_since: None })
    }

    /// When buffered rows must be flushed at the latest.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + LINGER)
    }

    /// Routes a batch from `port`.
    pub async fn send(&mut self, port: Port, batch: Batch) -> Result<()> {
        let max_parallelism = self.max_parallelism;
        let mut remaining = self.edges.iter().filter(|e| e.port == port).count();
        let mut batch = Some(batch);
        for edge in self.edges.iter_mut().filter(|e| e.port == port) {
            remaining -= 1;
            // The last edge takes the batch itself; only fan-out copies it.
            let batch = if remaining == 0 { batch.take().unwrap_or_default() } else { batch.clone().unwrap_or_default() };
            let n = edge.outputs.len();
            match edge.partition.clone() {
                Partition::Hash(key) if n > 1 => {
                    for (row, op) in batch.rows.into_iter().zip(batch.ops) {
                        let target = subtask_for(key_group(hash_key(&row, &key), max_parallelism), max_parallelism, n as u32) as usize;
                        edge.buffer_bytes[target] += row_bytes(&row);
                        edge.buffers[target].push(row, op);
                        flush_if_full(edge, target).await?;
                    }
                }
                Partition::Broadcast => {
                    for target in 0..n {
                        append(edge, target, batch.clone()).await?;
                    }
                }
                Partition::Rebalance if n > 1 => {
                    let target = edge.next % n;
                    edge.next = edge.next.wrapping_add(1);
                    append(edge, target, batch).await?;
                }
                _ => append(edge, 0, batch).await?,
            }
            if self.pending_since.is_none() && edge.buffers.iter().any(|b| !b.is_empty()) {
                self.pending_since = Some(Instant::now());
            }
        }
        Ok(())
    }

    /// Sends every partly filled buffer.
    pub async fn flush(&mut self) -> Result<()> {
        for edge in &mut self.edges {
            for target in 0..edge.outputs.len() {
                flush_one(edge, target).await?;
            }
        }
        self.pending_since = None;
        Ok(())
    }

    /// Flushes, then sends a control message (watermark, end) to every receiver.
    pub async fn broadcast(&mut self, msg: Message) -> Result<()> {
        self.flush().await?;
        for edge in &self.edges {
            for out in &edge.outputs {
                out.send(msg.clone(), &edge.metrics).await?;
            }
        }
        Ok(())
    }
}

/// Appends `batch` to the buffer of `target`, and sends the buffer once it is full.
async fn append(edge: &mut EdgeOutputs, target: usize, batch: Batch) -> Result<()> {
    edge.buffer_bytes[target] += batch.rows.iter().map(row_bytes).sum::<usize>();
    let buf = &mut edge.buffers[target];
    if buf.is_empty() {
        *buf = batch;
    } else {
        buf.rows.extend(batch.rows);
        buf.ops.extend(batch.ops);
    }
    flush_if_full(edge, target).await
}

async fn flush_if_full(edge: &mut EdgeOutputs, target: usize) -> Result<()> {
    if edge.buffers[target].len() >= BATCH_ROWS || edge.buffer_bytes[target] >= BATCH_BYTES {
        flush_one(edge, target).await?;
    }
    Ok(())
}

async fn flush_one(edge: &mut EdgeOutputs, target: usize) -> Result<()> {
    if edge.buffers[target].is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(&mut edge.buffers[target]);
    edge.buffer_bytes[target] = 0;
    edge.outputs[target].send(Message::Data(batch), &edge.metrics).await
}

/// How long a stream for a task not (yet) deployed here waits for its deployment before it is
/// closed: the coordinator deploys a job's tasks to all its workers at once, so a real sender
/// waits milliseconds (seconds on a worker busy restoring); one naming a task never deployed
/// here holds nothing once closed.
const DEPLOY_PATIENCE: Duration = Duration::from_secs(30);

/// The worker's gRPC data service: feeds remote senders' frames into local inboxes.
pub struct DataServer {
    /// Where frames go.
    pub inboxes: Inboxes,
}

#[tonic::async_trait]
impl DataService for DataServer {
    async fn exchange(&self, request: Request<Streaming<ExchangeFrame>>) -> std::result::Result<Response<ExchangeAck>, Status> {
        let mut frames = request.into_inner();
        let header = frames
            .message()
            .await?
            .and_then(|f| f.header)
            .ok_or_else(|| Status::invalid_argument("the first exchange frame must carry a header"))?;
        let task: TaskId = header.task_id.parse().map_err(Status::invalid_argument)?;
        let input = header.input as usize;
        let key = (header.job_id.clone(), header.attempt, task);
        let tx = self
            .inboxes
            .stream_sender_when_placed(&key, input, header.inputs as usize, DEPLOY_PATIENCE)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        while let Some(frame) = frames.message().await? {
            let msg = codec::decode(&frame.payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
            // Awaiting here while the inbox is full stops reading, which stops the sender.
            if tx.send(Delivery { input, msg }).await.is_err() {
                return Err(Status::cancelled("receiving task is gone"));
            }
        }
        Ok(Response::new(ExchangeAck {}))
    }
}

#[cfg(test)]
mod tests {
    use eddy_jobs::Value;

    use super::*;
    use crate::batch::Op;

    /// Rows routed by key reach the subtask that owns their key's group, whether it runs on this
    /// worker (its inbox) or on another (a gRPC stream, through the codec), and a barrier sent
    /// after them arrives after all of them at both.
    #[tokio::test]
    async fn keyed_rows_reach_their_owner_here_or_over_the_wire_and_a_barrier_follows_them() {
        let plan = eddy_jobs::compile(
            r#"
name = "routing"
parallelism = 2
[[source]]
name = "gen"
connector = "generator"
options = { keys = 50 }
event_time = { column = "ts" }
[[window]]
name = "w"
input = "gen"
kind = "tumble"
size = "1s"
key = ["k"]
aggregates = "COUNT(*) AS n"
[[sink]]
name = "out"
input = "w"
connector = "discard"
"#,
        )
        .unwrap();
        let (edge, hash) = plan.edges.iter().enumerate().find(|(_, e)| matches!(e.partition, Partition::Hash(_))).unwrap();
        let Partition::Hash(key) = hash.partition.clone() else { unreachable!() };
        let (from, to) = (hash.from, hash.to);
        assert_eq!(plan.outputs(TaskId { vertex: from, subtask: 0 }, edge).len(), 2);

        // Receiver 0 on this worker, receiver 1 behind another worker's data service.
        let here = Inboxes::default();
        let there = Inboxes::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let service = eddy_proto::data_service_server::DataServiceServer::new(DataServer { inboxes: there.clone() });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let receiver = |subtask| TaskId { vertex: to, subtask };
        here.fence("job", 1, [receiver(0)]);
        there.fence("job", 1, [receiver(1)]);
        let placement = HashMap::from([(receiver(0), "here".to_string()), (receiver(1), address)]);
        let peers = Peers::default();
        let wiring = Wiring {
            job_id: "job",
            attempt: 1,
            task: TaskId { vertex: from, subtask: 0 },
            plan: &plan,
            placement: &placement,
            local_address: "here",
            inboxes: &here,
            peers: &peers,
            metrics: &Default::default(),
        };
        let mut router = Router::open(&wiring).unwrap();
        let rows: Vec<Vec<Value>> =
            (0..3000).map(|seq| vec![Value::Int(seq), Value::Int(seq % 50), Value::Float(1.0), Value::Timestamp(seq)]).collect();
        router.send(Port::Main, Batch::inserts(rows)).await.unwrap();
        router.broadcast(Message::Barrier(7)).await.unwrap();

        let mut received = 0;
        for (inboxes, subtask) in [(&here, 0), (&there, 1)] {
            let task = receiver(subtask);
            let mut inputs = inboxes.receivers(&("job".to_string(), 1, task), plan.inputs(task).len()).unwrap();
            loop {
                let delivery = tokio::time::timeout(Duration::from_secs(10), inputs.recv(|_| false)).await.unwrap().unwrap();
                match delivery.msg {
                    Message::Data(batch) => {
                        for (row, op) in batch.rows.iter().zip(&batch.ops) {
                            let owner = subtask_for(key_group(hash_key(row, &key), plan.max_parallelism), plan.max_parallelism, 2);
                            assert_eq!((owner, *op), (subtask, Op::Insert), "row {row:?} reached subtask {subtask}");
                            received += 1;
                        }
                    }
                    Message::Barrier(7) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(received, 3000, "every row, each once, before the barrier");
    }

    /// A sender naming an input the task does not have is refused at once, with the reason (it
    /// used to wait forever on a channel nobody reads); so is one whose plan disagrees.
    #[tokio::test]
    async fn an_input_out_of_range_is_refused_not_left_waiting() {
        let inboxes = Inboxes::default();
        let key = ("job".to_string(), 1, TaskId { vertex: 2, subtask: 0 });
        inboxes.fence("job", 1, [key.2]);
        assert!(inboxes.sender(&key, 0, 2).is_ok());
        let e = inboxes.sender(&key, 2, 2).unwrap_err();
        assert_eq!(e.to_string(), "input 2 is out of range: task 2.0 has 2 inputs");
        assert!(matches!(inboxes.sender(&key, 0, 3), Err(Refused::PlansDiffer { known: 2, said: 3, .. })));
        assert!(matches!(inboxes.receivers(&key, 3), Err(Refused::PlansDiffer { .. })));
        let mut inputs = inboxes.receivers(&key, 2).unwrap();
        assert!(matches!(inboxes.receivers(&key, 2), Err(Refused::AlreadyTaken { .. })));
        // The task's inputs share the buffer: each holds its share, at least two.
        let tx = inboxes.sender(&key, 1, 2).unwrap();
        for n in 0..inbox_capacity(2) {
            tx.try_send(Delivery { input: 1, msg: Message::Watermark(n as i64) }).unwrap();
        }
        assert!(tx.try_send(Delivery { input: 1, msg: Message::Watermark(99) }).is_err());
        assert_eq!(inputs.recv(|_| false).await.unwrap().input, 1);
        assert_eq!(inbox_capacity(64), 2);
        inboxes.fence("job", 2, []);
        assert_eq!(inboxes.sender(&key, 0, 2).unwrap_err(), Refused::Superseded);
    }

    /// Only the tasks deployed here have inboxes: a stream naming another task (or job, or
    /// attempt) waits a moment for a deployment, then is refused and leaves nothing behind; a
    /// second stream into an input already fed is refused too.
    #[tokio::test(start_paused = true)]
    async fn streams_reach_only_tasks_deployed_here_one_per_input() {
        let inboxes = Inboxes::default();
        let placed = TaskId { vertex: 2, subtask: 0 };
        let key = |job: &str, attempt, task| (job.to_string(), attempt, task);
        let patience = Duration::from_secs(10);

        // Deployed while the stream waits: it gets its input.
        let waiting = tokio::spawn({
            let inboxes = inboxes.clone();
            async move { inboxes.stream_sender_when_placed(&key("job", 1, placed), 0, 1, patience).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        inboxes.fence("job", 1, [placed]);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(inboxes.stream_sender(&key("job", 1, placed), 0, 1).unwrap_err(), Refused::InputStreamed { task: placed, input: 0 });

        // Never deployed: refused once the patience runs out, and no inbox was made for it.
        let other = TaskId { vertex: 2, subtask: 1 };
        let started = Instant::now();
        for k in [key("job", 1, other), key("job", 7, placed), key("forged", 1, placed)] {
            assert!(matches!(inboxes.stream_sender_when_placed(&k, 0, 1, patience).await, Err(Refused::NotPlacedHere { .. })), "{k:?}");
        }
        assert_eq!(started.elapsed(), patience * 3);
        let table = inboxes.table();
        assert_eq!(table.slots.keys().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [key("job", 1, placed)]);
        assert_eq!(table.inputs.len(), 1);
        assert_eq!(table.streamed.len(), 1, "only the stream let in holds its input");
    }
}
