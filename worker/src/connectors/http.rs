//! The `http` sink (being written).
use async_trait::async_trait;
use eddy_jobs::connectors::HttpSinkOptions;

use super::{ConnectorContext, Sink};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// The sink.
pub struct HttpSink;

impl HttpSink {
    /// Builds the sink.
    pub fn new(_o: &HttpSinkOptions, _ctx: ConnectorContext) -> Result<HttpSink> {
        Err(TaskError::internal("http is not built yet"))
    }
}

#[async_trait]
impl Sink for HttpSink {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
