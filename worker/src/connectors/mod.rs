//! Connectors: sources that produce batches and sinks that write them, registered in one place
//! ([`source`] and [`sink`]) by the connector names specs use.

pub mod clickhouse;
#[cfg(test)]
mod conformance;
pub mod file;
pub mod generator;
pub mod http;
pub mod kafka;
pub mod postgres;
pub mod redis;

use async_trait::async_trait;
use eddy_jobs::connectors::{SinkConnector, SourceConnector};

use crate::batch::Batch;
use crate::error::Result;
use crate::operator::{ConnectorContext, Sink, Source, Stage};

/// Builds a source instance: every source connector is registered here.
pub async fn source(connector: &SourceConnector, ctx: ConnectorContext) -> Result<Box<dyn Source>> {
    Ok(match connector {
        SourceConnector::Generator(o) => {
            let restore = ctx.restore.as_ref().map(|(_, states)| states.as_slice()).unwrap_or_default();
            Box::new(generator::Generator::new(o.clone(), ctx.task.subtask, ctx.parallelism).restored(restore)?)
        }
        SourceConnector::PostgresCdc(o) => Box::new(postgres::cdc::PostgresCdc::start(o, ctx).await?),
        SourceConnector::Kafka(o) => Box::new(kafka::KafkaSource::start(o, ctx)?),
        SourceConnector::File(o) => Box::new(file::FileSource::open(o, &ctx)?),
    })
}

/// Builds a sink instance: every sink connector is registered here.
pub async fn sink(connector: &SinkConnector, ctx: ConnectorContext) -> Result<Box<dyn Sink>> {
    Ok(match connector {
        SinkConnector::File(o) => Box::new(file::FileSink::open(o, &ctx)?),
        SinkConnector::Discard => Box::new(Discard),
        SinkConnector::Kafka(o) => Box::new(kafka::KafkaSink::start(o, ctx).await?),
        SinkConnector::Redis(o) => Box::new(redis::RedisLeaderboard::connect(o, ctx).await?),
        SinkConnector::ClickHouse(o) => Box::new(clickhouse::ClickHouseSink::new(o, ctx)?),
        SinkConnector::Http(o) => Box::new(http::HttpSink::new(o, ctx)?),
    })
}

/// Drops every row.
struct Discard;

impl Stage for Discard {}

#[async_trait]
impl Sink for Discard {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
