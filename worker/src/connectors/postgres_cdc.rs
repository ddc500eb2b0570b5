//! The `postgres_cdc` source (being written).
use async_trait::async_trait;
use eddy_jobs::connectors::PostgresCdcOptions;

use super::{ConnectorContext, Source};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// Reads a table's snapshot, then its changes.
pub struct PostgresCdc;

impl PostgresCdc {
    /// Connects, creates the slot and publication if missing, and starts the snapshot.
    pub async fn start(_o: &PostgresCdcOptions, _ctx: ConnectorContext) -> Result<PostgresCdc> {
        Err(TaskError::internal("postgres_cdc is not built yet"))
    }
}

#[async_trait]
impl Source for PostgresCdc {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        Ok(None)
    }
}
