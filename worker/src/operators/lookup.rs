//! The `postgres` lookup join (being written).
use eddy_jobs::connectors::PostgresLookupOptions;
use eddy_jobs::Schema;

use super::{Collector, Operator};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// LEFT join with a PostgreSQL table or view.
pub struct PostgresLookup;

impl PostgresLookup {
    /// Connects.
    pub async fn connect(_o: &PostgresLookupOptions, _on: usize, _columns: &Schema) -> Result<PostgresLookup> {
        Err(TaskError::internal("lookup is not built yet"))
    }
}

#[async_trait::async_trait]
impl Operator for PostgresLookup {
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        out.main.push(batch);
        Ok(())
    }
}
