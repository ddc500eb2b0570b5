//! Worker configuration: defaults, then environment (`EDDY_*`), then flags (see `main.rs`).

/// What a worker needs to know to join a cluster.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique id of this worker.
    pub worker_id: String,
    /// Coordinator `host:port` (or a full `http://` URL); for replicated coordinators several,
    /// comma-separated (the worker finds the leader among them).
    pub coordinator: String,
    /// Task slots offered (parallel pipelines this worker runs).
    pub slots: u32,
    /// `host:port` other workers reach this worker's data service on.
    pub advertised_address: String,
    /// Local directory for task state (RocksDB) and checkpoint scratch files.
    pub state_dir: std::path::PathBuf,
}

impl WorkerConfig {
    /// The coordinators listed.
    pub fn coordinators(&self) -> Vec<String> {
        eddy_proto::address_list(&self.coordinator)
    }
}
