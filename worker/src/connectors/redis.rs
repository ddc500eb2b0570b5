//! The `redis` sink (being written).
use async_trait::async_trait;
use eddy_jobs::connectors::RedisSinkOptions;

use super::{ConnectorContext, Sink};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// The sink.
pub struct RedisLeaderboard;

impl RedisLeaderboard {
    /// Builds the sink.
    pub async fn connect(_o: &RedisSinkOptions, _ctx: ConnectorContext) -> Result<RedisLeaderboard> {
        Err(TaskError::internal("redis is not built yet"))
    }
}

#[async_trait]
impl Sink for RedisLeaderboard {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
