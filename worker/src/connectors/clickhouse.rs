//! The `clickhouse` sink (being written).
use async_trait::async_trait;
use eddy_jobs::connectors::ClickHouseSinkOptions;

use super::{ConnectorContext, Sink};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// The sink.
pub struct ClickHouseSink;

impl ClickHouseSink {
    /// Builds the sink.
    pub fn new(_o: &ClickHouseSinkOptions, _ctx: ConnectorContext) -> Result<ClickHouseSink> {
        Err(TaskError::internal("clickhouse is not built yet"))
    }
}

#[async_trait]
impl Sink for ClickHouseSink {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
