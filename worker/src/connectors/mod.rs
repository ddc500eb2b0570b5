//! Connectors: sources that produce batches and sinks that write them, registered in one place
//! ([`source`] and [`sink`]) by the connector names specs use.

pub mod file;
pub mod generator;

use async_trait::async_trait;
use eddy_jobs::connectors::{SinkConnector, SourceConnector};
use eddy_jobs::Schema;

use crate::batch::Batch;
use crate::error::Result;

/// Produces batches. `next_batch` must be cancel-safe: dropping its future loses nothing.
#[async_trait]
pub trait Source: Send {
    /// The next batch, or `None` once the source is exhausted.
    async fn next_batch(&mut self) -> Result<Option<Batch>>;
}

/// Writes batches to an external system.
#[async_trait]
pub trait Sink: Send {
    /// Writes one batch; returning means the sink has taken responsibility for it.
    async fn write(&mut self, batch: Batch) -> Result<()>;
    /// The input watermark advanced; a chance to flush.
    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        Ok(())
    }
    /// No more input: flush everything.
    async fn finish(&mut self) -> Result<()>;
}

/// Builds subtask `subtask` of `parallelism` of a source.
pub fn source(connector: &SourceConnector, subtask: u32, parallelism: u32) -> Result<Box<dyn Source>> {
    Ok(match connector {
        SourceConnector::Generator(o) => Box::new(generator::Generator::new(o.clone(), subtask, parallelism)),
    })
}

/// Builds subtask `subtask` of `parallelism` of a sink whose input has `schema`.
pub fn sink(connector: &SinkConnector, schema: &Schema, subtask: u32, parallelism: u32) -> Result<Box<dyn Sink>> {
    Ok(match connector {
        SinkConnector::File(o) => Box::new(file::FileSink::open(o, schema, subtask, parallelism)?),
        SinkConnector::Discard => Box::new(Discard),
    })
}

/// Drops every row.
struct Discard;

#[async_trait]
impl Sink for Discard {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
