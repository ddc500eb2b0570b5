//! The `file` sink: newline-delimited JSON, one object per row keyed by column name. Timestamps are
//! written as Unix milliseconds; retractions carry `"_op": "-"`. Subtask `i` of a sink with
//! parallelism above 1 writes `<path>.<i>`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::FileSinkOptions;
use eddy_jobs::{Schema, Value};
use tokio::time::Instant;

use super::Sink;
use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};

/// The file sink.
pub struct FileSink {
    path: String,
    out: BufWriter<File>,
    columns: Vec<String>,
    rows_per_second: Option<u64>,
    written: u64,
    started: Instant,
}

impl FileSink {
    /// Creates (truncates) the subtask's file.
    pub fn open(o: &FileSinkOptions, schema: &Schema, subtask: u32, parallelism: u32) -> Result<FileSink> {
        let path = if parallelism > 1 { format!("{}.{subtask}", o.path) } else { o.path.clone() };
        if let Some(dir) = std::path::Path::new(&path).parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(&path, e))?;
        }
        let file = File::create(&path).map_err(|e| io_error(&path, e))?;
        Ok(FileSink {
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            columns: schema.fields.iter().map(|f| serde_json::to_string(&f.name).unwrap_or_default()).collect(),
            rows_per_second: o.rows_per_second,
            written: 0,
            started: Instant::now(),
        })
    }
}

fn io_error(path: &str, e: std::io::Error) -> TaskError {
    TaskError::external(format!("file sink `{path}`: {e}; check the path exists and is writable"))
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) | Value::Timestamp(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Float(f) if f.is_finite() => out.extend_from_slice(serde_json::Number::from_f64(*f).map(|n| n.to_string()).unwrap_or_default().as_bytes()),
        Value::Float(_) => out.extend_from_slice(b"null"),
        Value::String(s) => out.extend_from_slice(serde_json::to_string(&**s).unwrap_or_default().as_bytes()),
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        let mut line = Vec::with_capacity(128);
        for (row, op) in batch.rows.iter().zip(&batch.ops) {
            if let Some(rate) = self.rows_per_second {
                let due = self.started + Duration::from_secs_f64(self.written as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
            line.clear();
            line.push(b'{');
            for (i, (name, v)) in self.columns.iter().zip(row).enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                line.extend_from_slice(name.as_bytes());
                line.push(b':');
                write_value(&mut line, v);
            }
            if *op == Op::Retract {
                line.extend_from_slice(b",\"_op\":\"-\"");
            }
            line.extend_from_slice(b"}\n");
            self.out.write_all(&line).map_err(|e| io_error(&self.path, e))?;
            self.written += 1;
        }
        Ok(())
    }

    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }

    async fn tick(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }

    async fn finish(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| io_error(&self.path, e))
    }
}
