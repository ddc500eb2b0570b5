//! The `kafka` source and sink (being written).
use async_trait::async_trait;
use eddy_jobs::connectors::{KafkaSinkOptions, KafkaSourceOptions};

use super::{ConnectorContext, Sink, Source};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// Reads a topic.
pub struct KafkaSource;

impl KafkaSource {
    /// Joins the consumer group.
    pub fn start(_o: &KafkaSourceOptions, _ctx: ConnectorContext) -> Result<KafkaSource> {
        Err(TaskError::internal("kafka is not built yet"))
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        Ok(None)
    }
}

/// Writes a topic.
pub struct KafkaSink;

impl KafkaSink {
    /// Creates the producer.
    pub fn start(_o: &KafkaSinkOptions, _ctx: ConnectorContext) -> Result<KafkaSink> {
        Err(TaskError::internal("kafka is not built yet"))
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
