//! Operators: synchronous, CPU-only steps of a chain (transforms and windows). Sources and sinks,
//! which wait on the outside world, are connectors (see `crate::connectors`). `build` turns a planned
//! operator into a running one; running them is the task runtime's job (`crate::task`).

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
pub trait Operator: Send {
    /// Processes a batch of input rows.
    fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()>;

    /// The input watermark advanced to `watermark`; the runtime forwards it downstream afterwards.
    fn on_watermark(&mut self, _watermark: i64, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// All input has ended (after a final watermark).
    fn on_end(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// Records dropped as late so far.
    fn late_records(&self) -> u64 {
        0
    }
}

/// Builds operator `index` of `plan`; `None` for sources and sinks.
pub fn build(plan: &Plan, index: usize) -> Option<Box<dyn Operator>> {
    let op = &plan.operators[index];
    match &op.kind {
        OperatorKind::Transform { filter, projection } => {
            Some(Box::new(transform::Transform::new(filter.clone(), projection.clone())))
        }
        OperatorKind::Window(w) => Some(Box::new(window::Window::new(w.clone(), Box::new(MemoryWindowState::default())))),
        OperatorKind::Source { .. } | OperatorKind::Sink { .. } => None,
    }
}
