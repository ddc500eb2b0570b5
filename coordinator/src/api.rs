//! gRPC handlers: validate, convert, ask the actor, await its answer. No state lives here.
//!
//! A replicated coordinator that does not lead has no actor: it answers with the leader's address
//! (in the message and in the `eddy-leader` metadata), and the CLI and workers go there.

use eddy_proto::cluster_service_server::ClusterService;
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::job_service_server::JobService;
use eddy_proto::worker_message::Msg as Report;
use eddy_proto::*;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::actor::Request as Ask;
use crate::job::AfterSavepoint;

/// Who answers requests: this coordinator's actor, or (replicated, not leading) the leader.
#[derive(Clone, Debug)]
pub enum Route {
    Here(mpsc::Sender<Ask>),
    /// The leader's address, when one is known.
    Leader(Option<String>),
}

/// The gRPC metadata key that carries the leader's address on a refusal.
pub const LEADER_KEY: &str = "eddy-leader";

/// The refusal of a coordinator that does not lead.
pub fn not_leader(leader: Option<&str>) -> Status {
    let Some(leader) = leader else {
        return Status::unavailable(
            "no coordinator leads: an election is under way, or most coordinators are down; try again once a majority runs",
        );
    };
    let mut status = Status::unavailable(format!("this coordinator does not lead; the leader is at {leader}"));
    if let Ok(value) = leader.parse() {
        status.metadata_mut().insert(LEADER_KEY, value);
    }
    status
}

/// The job and cluster services, backed by the actor while this coordinator leads.
#[derive(Clone)]
pub struct Api {
    pub route: watch::Receiver<Route>,
    /// Told to workers at registration.
    pub heartbeat_interval_ms: u64,
    /// The Raft node, for a replicated coordinator.
    pub raft: Option<RaftView>,
}

/// What the API reads of, and asks of, the Raft node.
#[derive(Clone)]
pub struct RaftView {
    pub status: watch::Receiver<crate::raft::RaftStatus>,
    pub inputs: std::sync::mpsc::Sender<crate::raft::Input>,
}

impl Api {
    fn actor(&self) -> Result<mpsc::Sender<Ask>, Status> {
        match &*self.route.borrow() {
            Route::Here(actor) => Ok(actor.clone()),
            Route::Leader(leader) => Err(not_leader(leader.as_deref())),
        }
    }

    /// Every job's status, as `eddy status` shows it, oldest job first (none when this
    /// coordinator does not lead).
    pub(crate) async fn job_statuses(&self) -> Vec<JobStatusResponse> {
        let mut out = Vec::new();
        for job in self.ask(|reply| Ask::ListJobs { reply }).await.unwrap_or_default() {
            let job_id = job.job_id;
            if let Ok(Ok(status)) = self.ask(|reply| Ask::JobStatus { job_id, reply }).await {
                out.push(status);
            }
        }
        out
    }

    pub(crate) async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Result<T, Status> {
        ask_on(&self.actor()?, make).await
    }

    fn coordinators_view(&self) -> CoordinatorsResponse {
        let Some(raft) = &self.raft else {
            return CoordinatorsResponse { replicated: false, ..Default::default() };
        };
        let s = raft.status.borrow().clone();
        let coordinators = s
            .peers
            .iter()
            .map(|(id, address)| {
                let seen = s.matched.get(id).copied();
                let role = match seen {
                    _ if *id == s.id => role_name(s.role),
                    _ if *id == s.leader => "leader",
                    Some((_, true)) => "follower",
                    Some((_, false)) => "unreachable",
                    None => "unknown",
                };
                let applied = if *id == s.id { s.applied } else { seen.map_or(0, |(matched, _)| matched) };
                CoordinatorView { id: *id, address: address.clone(), role: role.into(), term: s.term, applied }
            })
            .collect();
        CoordinatorsResponse {
            replicated: true,
            answered_by: s.id,
            leader_address: s.leader_address().unwrap_or_default().to_string(),
            coordinators,
        }
    }
}

async fn ask_on<T>(actor: &mpsc::Sender<Ask>, make: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    let gone = || Status::unavailable("this coordinator stopped leading or is shutting down; try again");
    actor.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

fn role_name(role: raft::StateRole) -> &'static str {
    match role {
        raft::StateRole::Leader => "leader",
        raft::StateRole::Follower => "follower",
        raft::StateRole::Candidate | raft::StateRole::PreCandidate => "candidate",
    }
}

#[tonic::async_trait]
impl JobService for Api {
    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        let SubmitRequest { spec, from_savepoint } = request.into_inner();
        // Validated here, on a blocking thread, not in the coordinator's loop.
        let (spec, plan) = tokio::task::spawn_blocking(move || {
            let plan = eddy_jobs::compile(&spec);
            (spec, plan)
        })
        .await
        .map_err(|e| Status::internal(format!("validating the spec: {e}")))?;
        let plan = Box::new(plan.map_err(|e| Status::invalid_argument(format!("invalid job spec: {e}")))?);
        let job_id = self.ask(|reply| Ask::Submit { spec, plan, from_savepoint, reply }).await??;
        Ok(Response::new(SubmitResponse { job_id }))
    }

    async fn savepoint(&self, request: Request<SavepointRequest>) -> Result<Response<SavepointResponse>, Status> {
        let SavepointRequest { job_id, cancel } = request.into_inner();
        let then = if cancel { AfterSavepoint::Cancel } else { AfterSavepoint::Continue };
        let done = self.ask(|reply| Ask::Savepoint { job_id, then, reply }).await??;
        Ok(Response::new(SavepointResponse { savepoint_id: done.savepoint_id, savepoint: Some(done.view) }))
    }

    async fn rescale(&self, request: Request<RescaleRequest>) -> Result<Response<RescaleResponse>, Status> {
        let RescaleRequest { job_id, parallelism } = request.into_inner();
        if parallelism == 0 {
            return Err(Status::invalid_argument("parallelism must be at least 1"));
        }
        let then = AfterSavepoint::Rescale(parallelism);
        let done = self.ask(|reply| Ask::Savepoint { job_id, then, reply }).await??;
        Ok(Response::new(RescaleResponse { savepoint_id: done.savepoint_id, attempt: done.attempt }))
    }

    async fn backfill(&self, request: Request<BackfillRequest>) -> Result<Response<BackfillResponse>, Status> {
        let BackfillRequest { job_id, source, filter } = request.into_inner();
        Ok(Response::new(self.ask(|reply| Ask::Backfill { job_id, source, filter, reply }).await??))
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.ask(|reply| Ask::ListJobs { reply }).await?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn job_status(&self, request: Request<JobStatusRequest>) -> Result<Response<JobStatusResponse>, Status> {
        let job_id = request.into_inner().job_id;
        Ok(Response::new(self.ask(|reply| Ask::JobStatus { job_id, reply }).await??))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let CancelRequest { job_id, keep_slots } = request.into_inner();
        Ok(Response::new(self.ask(|reply| Ask::Cancel { job_id, release: !keep_slots, reply }).await??))
    }

    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.ask(|reply| Ask::ListWorkers { reply }).await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn coordinators(&self, _: Request<CoordinatorsRequest>) -> Result<Response<CoordinatorsResponse>, Status> {
        Ok(Response::new(self.coordinators_view()))
    }

    async fn change_coordinators(&self, request: Request<ChangeCoordinatorsRequest>) -> Result<Response<CoordinatorsResponse>, Status> {
        let Some(raft) = self.raft.clone() else {
            return Err(Status::failed_precondition(
                "this coordinator runs alone (no --raft-peers); start every coordinator with --raft-id and --raft-peers to replicate",
            ));
        };
        let ChangeCoordinatorsRequest { add_id, add_address, remove_id } = request.into_inner();
        let (add, remove) = match (add_id, remove_id) {
            (0, 0) | (1.., 1..) => return Err(Status::invalid_argument("add one coordinator (its id and address) or remove one")),
            (id, 0) if add_address.is_empty() => return Err(Status::invalid_argument(format!("coordinator {id} needs an address"))),
            (id, 0) => (Some((id, add_address)), None),
            (0, id) => (None, Some(id)),
        };
        let (reply, answer) = std::sync::mpsc::channel();
        raft.inputs
            .send(crate::raft::Input::ChangeMembers { add, remove, reply })
            .map_err(|_| Status::unavailable("the raft node has stopped"))?;
        let answered = tokio::task::spawn_blocking(move || answer.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match answered {
            Ok(Ok(())) => Ok(Response::new(self.coordinators_view())),
            Ok(Err(crate::raft::ProposeError::NotLeader { leader })) => Err(not_leader(leader.as_deref())),
            Ok(Err(e @ crate::raft::ProposeError::MembershipBusy)) => Err(Status::failed_precondition(e.to_string())),
            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
            Err(_) => Err(Status::unavailable("no majority of coordinators committed the change within 10 s")),
        }
    }
}

#[tonic::async_trait]
impl ClusterService for Api {
    type ControlStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn control(&self, request: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::ControlStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await?.and_then(|m| m.msg) {
            Some(Report::Register(r)) => r,
            _ => return Err(Status::invalid_argument("the first message on the control stream must be `register`")),
        };
        if register.worker_id.is_empty() || register.slots == 0 || register.data_address.is_empty() {
            return Err(Status::invalid_argument("register needs a worker id, at least one slot and a data address"));
        }
        let (orders, rx) = mpsc::channel(64);
        let worker_id = register.worker_id.clone();
        // The stream stays with the actor it registered with: when that one stops (this
        // coordinator no longer leads), the stream ends and the worker finds the leader.
        let actor = self.actor()?;
        let session = ask_on(&actor, |reply| Ask::Register {
            worker_id: register.worker_id,
            slots: register.slots,
            data_address: register.data_address,
            orders: orders.clone(),
            reply,
        })
        .await?
        .map_err(Status::already_exists)?;
        let interval = self.heartbeat_interval_ms;
        orders
            .send(Ok(CoordinatorMessage { msg: Some(Order::Registered(Registered { heartbeat_interval_ms: interval })) }))
            .await
            .map_err(|_| Status::internal("control stream closed during registration"))?;
        tokio::spawn(async move {
            let cause = loop {
                let ask = match inbound.message().await {
                    Ok(Some(WorkerMessage { msg: Some(Report::Heartbeat(h)) })) => {
                        Ask::Heartbeat { worker_id: worker_id.clone(), session, tasks: h.tasks }
                    }
                    Ok(Some(WorkerMessage { msg: Some(Report::TaskUpdate(update)) })) => {
                        Ask::TaskUpdate { worker_id: worker_id.clone(), session, update }
                    }
                    Ok(Some(WorkerMessage { msg: Some(Report::CheckpointAck(ack)) })) => {
                        Ask::CheckpointAck { worker_id: worker_id.clone(), session, ack }
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break "control stream closed".to_string(),
                    Err(e) => break format!("control stream broke: {}", e.message()),
                };
                if actor.send(ask).await.is_err() {
                    return;
                }
            };
            let _ = actor.send(Ask::Disconnected { worker_id, session, cause }).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
