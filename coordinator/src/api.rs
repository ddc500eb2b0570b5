//! gRPC handlers: validate, convert, ask the actor, await its answer. No state lives here.

use eddy_proto::cluster_service_server::ClusterService;
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::job_service_server::JobService;
use eddy_proto::worker_message::Msg as Report;
use eddy_proto::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::actor::{AfterSavepoint, Request as Ask};

/// The job and cluster services, both backed by the actor.
#[derive(Clone)]
pub struct Api {
    /// The actor's request channel.
    pub actor: mpsc::Sender<Ask>,
    /// Told to workers at registration.
    pub heartbeat_interval_ms: u64,
}

impl Api {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.actor.send(make(tx)).await.map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))
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
        let session = self
            .ask(|reply| Ask::Register {
                worker_id: register.worker_id,
                slots: register.slots,
                data_address: register.data_address,
                orders: orders.clone(),
                reply,
            })
            .await?;
        let interval = self.heartbeat_interval_ms;
        orders
            .send(Ok(CoordinatorMessage { msg: Some(Order::Registered(Registered { heartbeat_interval_ms: interval })) }))
            .await
            .map_err(|_| Status::internal("control stream closed during registration"))?;
        let actor = self.actor.clone();
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
