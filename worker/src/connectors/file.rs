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
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::json::{json_string, push_object, Timestamps};
use crate::operator::{ConnectorContext, InlineState, OperatorSnapshot, Sink, Source, Stage};

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
        for state in ctx.restore.iter().flat_map(|(_, states)| states) {
            // Before versioned state: the two as little-endian words.
            let word = |old: &[u8], at: usize| u64::from_le_bytes(old[at..at + 8].try_into().unwrap_or_default());
            let read = state.read(|old| Ok((old.len() == 16).then(|| ReadTo { offset: word(old, 0), line: word(old, 8) })))?;
            if let Some(ReadTo { offset, line }) = read {
                (source.offset, source.line) = (offset, line);
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
impl Stage for FileSource {
    async fn snapshot(&mut self, _id: u64, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        if self.reader.is_none() {
            return Ok(OperatorSnapshot::default());
        }
        Ok(OperatorSnapshot::state(&ReadTo { offset: self.offset, line: self.line }))
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
}

/// How far the file source has read: the byte offset of the next line and its number.
#[derive(Serialize, Deserialize)]
struct ReadTo {
    offset: u64,
    line: u64,
}

impl InlineState for ReadTo {
    const HOLDER: &'static str = "file source";
    const VERSION: u8 = 1;
}

/// The file sink.
pub struct FileSink {
    path: String,
    out: BufWriter<File>,
    /// Each column's name as a JSON string, and its index.
    columns: Vec<(String, usize)>,
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
        // The longest length a checkpoint stored for this path.
        let mut length = 0;
        for state in ctx.restore.iter().flat_map(|(_, states)| states) {
            if let Some(written) = state.read(|old| Ok(Written::unversioned(old)))?.filter(|w| w.path == path) {
                length = length.max(written.length);
            }
        }
        let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(|e| io_error(&path, e))?;
        file.set_len(length).map_err(|e| io_error(&path, e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(|e| io_error(&path, e))?;
        Ok(FileSink {
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            columns: schema.fields.iter().enumerate().map(|(i, f)| (json_string(&f.name), i)).collect(),
            rows_per_second: o.rows_per_second,
            written: 0,
            started: Instant::now(),
        })
    }
}

/// What a file sink had written when a checkpoint was taken: its file and that file's length.
#[derive(Serialize, Deserialize)]
struct Written {
    path: String,
    length: u64,
}

impl InlineState for Written {
    const HOLDER: &'static str = "file sink";
    const VERSION: u8 = 1;
}

impl Written {
    /// Before versioned state: the length as a little-endian word, then the path.
    fn unversioned(state: &[u8]) -> Option<Written> {
        let length = u64::from_le_bytes(state.get(..8)?.try_into().ok()?);
        Some(Written { path: String::from_utf8(state.get(8..)?.to_vec()).ok()?, length })
    }
}

fn io_error(path: &str, e: std::io::Error) -> TaskError {
    TaskError::external(format!("file sink `{path}`: {e}; check the path exists and is writable"))
}

#[async_trait]
impl Stage for FileSink {
    async fn tick(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }

    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        let file = self.out.get_ref();
        file.sync_data().map_err(|e| io_error(&self.path, e))?;
        let length = file.metadata().map_err(|e| io_error(&self.path, e))?.len();
        Ok(OperatorSnapshot::state(&Written { path: self.path.clone(), length }))
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        let mut line = String::with_capacity(128);
        for (row, op) in batch.rows.iter().zip(&batch.ops) {
            if let Some(rate) = self.rows_per_second {
                let due = self.started + Duration::from_secs_f64(self.written as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
            line.clear();
            push_object(&mut line, &self.columns, row, Timestamps::EpochMillis);
            if *op == Op::Retract {
                line.pop();
                line.push_str(",\"_op\":\"-\"}");
            }
            line.push('\n');
            self.out.write_all(line.as_bytes()).map_err(|e| io_error(&self.path, e))?;
            self.written += 1;
        }
        Ok(())
    }

    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }

    async fn finish(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| io_error(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use eddy_jobs::connectors::FileSourceOptions;
    use eddy_jobs::{DataType, Field, Schema, TaskId};

    use super::*;
    use crate::operator::RestoredState;

    /// A checkpoint from before versioned state whose offset happens to begin with the tag's bytes
    /// is still read as the offset it is, not refused as a broken versioned state.
    #[test]
    fn an_unversioned_offset_that_looks_like_the_tag_still_restores() {
        let dir = crate::testing::temp_dir("file-source");
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"id\": 1}\n").unwrap();
        let offset = u64::from_le_bytes([b'E', b'D', b'D', b'Y', 1, 0, 0, 0]);
        let inline = [offset.to_le_bytes(), 7u64.to_le_bytes()].concat();
        let schema = Schema::new(vec![Field::new("id", DataType::Int)]);
        let mut ctx = ConnectorContext::for_test(TaskId { vertex: 0, subtask: 0 }, 1, schema);
        ctx.restore = Some((1, vec![RestoredState { inline, files: None }]));
        let o = FileSourceOptions { path: path.display().to_string(), columns: "id BIGINT".into() };
        let source = FileSource::open(&o, &ctx).unwrap();
        assert_eq!((source.offset, source.line), (offset, 7));
    }
}
