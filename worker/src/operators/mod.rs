//! Operators: the steps of a chain between a source and a sink (transforms, windows, lookups).
//! Sources and sinks are connectors (see `crate::connectors`). `build` turns a planned
//! operator into a running one; running them is the task runtime's job (`crate::task`).

pub mod lookup;
pub mod transform;
pub mod window;

use eddy_jobs::plan::{OperatorKind, Plan};

use crate::batch::Batch;
use crate::error::Result;
use crate::state::MemoryWindowState;

/// Where an operator puts its output.
#[derive(Debug, Default)]
pub struct Collector {
    /// Main output.
    pub main: Vec<Batch>,
    /// Late records (windows only).
    pub late: Vec<Batch>,
}

/// One step of a chain. Only `process_batch` is required; the hooks default to doing nothing.
/// Methods are async so that an operator may wait on an external system (a lookup); CPU-only
/// operators simply never await.
#[async_trait::async_trait]
pub trait Operator: Send {
    /// Processes a batch of input rows.
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()>;

    /// The input watermark advanced to `watermark`; the runtime forwards it downstream afterwards.
    async fn on_watermark(&mut self, _watermark: i64, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// All input has ended (after a final watermark).
    async fn on_end(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// Records dropped as late so far.
    fn late_records(&self) -> u64 {
        0
    }
}

/// Builds operator `index` of `plan`; `None` for sources and sinks.
pub async fn build(plan: &Plan, index: usize) -> Result<Option<Box<dyn Operator>>> {
    let op = &plan.operators[index];
    Ok(match &op.kind {
        OperatorKind::Transform { filter, projection } => {
            Some(Box::new(transform::Transform::new(filter.clone(), projection.clone())))
        }
        OperatorKind::Window(w) => Some(Box::new(window::Window::new(w.clone(), Box::new(MemoryWindowState::default())))),
        OperatorKind::Lookup { options, on, columns } => {
            Some(Box::new(lookup::PostgresLookup::connect(options, *on, columns).await?))
        }
        OperatorKind::Source { .. } | OperatorKind::Sink { .. } => None,
    })
}
