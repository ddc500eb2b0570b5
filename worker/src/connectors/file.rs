//! The `file` source and sink.
//!
//! The source reads a file of newline-delimited JSON objects once, from subtask 0 (a file is one
//! ordered stream); its checkpointed position is the byte offset of the next line.
//!
//! The sink writes newline-delimited JSON, one object per row keyed by column name. Timestamps are
//! written as Unix milliseconds; retractions carry `"_op": "-"`. Subtask `i` of a sink with
//! parallelism above 1 writes `<path>.<i>`.
//!
//! Exactly once with checkpoints: the file only grows, so on a barrier the sink flushes, syncs and
//! stores its length; a restore cuts the file back to the length its checkpoint stored, dropping
//! what was written after it, which the restored job writes again. (Readers may see those rows
//! before they are cut: the guarantee is about the file once the job has finished.)

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::FileSinkOptions;
use eddy_jobs::Value;
use tokio::time::Instant;

use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::operator::{ConnectorContext, OperatorSnapshot, Sink, Source};

/// Lines per batch of the source.
const SOURCE_BATCH: usize = 1024;

/// The file source.
pub struct FileSource {
    path: String,
    reader: Option<std::io::BufReader<File>>,
    schema: eddy_jobs::Schema,
    /// Byte offset of the next line, and its number (1-based).
    offset: u64,
    line: u64,
}

impl FileSource {
    /// Opens the file (subtask 0 only), at the offset a restored checkpoint stored.
    pub fn open(o: &eddy_jobs::connectors::FileSourceOptions, ctx: &ConnectorContext) -> Result<FileSource> {
        let mut source = FileSource { path: o.path.clone(), reader: None, schema: ctx.schema.clone(), offset: 0, line: 1 };
        if ctx.task.subtask != 0 {
            return Ok(source);
        }
        if let Some((_, states)) = &ctx.restore {
            for s in states.iter().map(|s| &s.inline).filter(|s| s.len() == 16) {
                source.offset = u64::from_le_bytes(s[..8].try_into().unwrap_or_default());
                source.line = u64::from_le_bytes(s[8..].try_into().unwrap_or_default());
            }
        }
        let mut file = File::open(&o.path)
            .map_err(|e| TaskError::user(format!("file source: options.path `{}`: {e}; check the file exists", o.path)))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(source.offset)).map_err(|e| io_error(&o.path, e))?;
        source.reader = Some(std::io::BufReader::with_capacity(1 << 20, file));
        Ok(source)
    }
}

#[async_trait]
impl Source for FileSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let Some(reader) = self.reader.as_mut() else { return Ok(None) };
        let mut batch = Batch::with_capacity(SOURCE_BATCH);
        let mut buf = Vec::with_capacity(256);
        while batch.len() < SOURCE_BATCH {
            buf.clear();
            let n = std::io::BufRead::read_until(reader, b'\n', &mut buf).map_err(|e| io_error(&self.path, e))?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            let at = self.line;
            self.line += 1;
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let row = serde_json::from_slice(text)
                .map_err(|e| e.to_string())
                .and_then(|json| crate::json::row_from_json(&self.schema, &json))
                .map_err(|e| TaskError::user(format!("file source `{}` line {at}: {e}", self.path)))?;
            batch.push(row, Op::Insert);
        }
        Ok((!batch.is_empty()).then_some(batch))
    }

    async fn snapshot(&mut self, _id: u64, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        if self.reader.is_none() {
            return Ok(OperatorSnapshot::default());
        }
        Ok(OperatorSnapshot::inline([self.offset, self.line].iter().flat_map(|w| w.to_le_bytes()).collect()))
    }
}

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
    /// Creates (truncates) the subtask's file, or on a restore cuts it back to its checkpointed
    /// length.
    pub fn open(o: &FileSinkOptions, ctx: &ConnectorContext) -> Result<FileSink> {
        let (schema, subtask, parallelism) = (&ctx.schema, ctx.task.subtask, ctx.parallelism);
        let path = if parallelism > 1 { format!("{}.{subtask}", o.path) } else { o.path.clone() };
        if let Some(dir) = std::path::Path::new(&path).parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(&path, e))?;
        }
        let length = match &ctx.restore {
            None => 0,
            Some((_, states)) => states.iter().filter_map(|s| stored_length(&s.inline, &path)).max().unwrap_or(0),
        };
        let file = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(|e| io_error(&path, e))?;
        file.set_len(length).map_err(|e| io_error(&path, e))?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(|e| io_error(&path, e))?;
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

/// The length a checkpoint stored for `path`, if this state is about that file.
fn stored_length(state: &[u8], path: &str) -> Option<u64> {
    let length = u64::from_le_bytes(state.get(..8)?.try_into().ok()?);
    (state.get(8..)? == path.as_bytes()).then_some(length)
}

fn io_error(path: &str, e: std::io::Error) -> TaskError {
    TaskError::external(format!("file sink `{path}`: {e}; check the path exists and is writable"))
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) | Value::Timestamp(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Float(f) if f.is_finite() => {
            out.extend_from_slice(serde_json::Number::from_f64(*f).map(|n| n.to_string()).unwrap_or_default().as_bytes())
        }
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

    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        let file = self.out.get_ref();
        file.sync_data().map_err(|e| io_error(&self.path, e))?;
        let length = file.metadata().map_err(|e| io_error(&self.path, e))?.len();
        let mut state = length.to_le_bytes().to_vec();
        state.extend_from_slice(self.path.as_bytes());
        Ok(OperatorSnapshot::inline(state))
    }

    async fn finish(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| io_error(&self.path, e))
    }
}
