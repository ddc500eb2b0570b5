//! Operators: the steps of a chain between a source and a sink (transforms and windows here; the
//! lookup join lives with the rest of the PostgreSQL code in `crate::connectors::postgres`).
//! Sources and sinks are connectors (see `crate::connectors`). `build` turns a planned operator
//! into a running one; running them is the task runtime's job (`crate::task`).

pub mod transform;
pub mod window;

use eddy_jobs::plan::{OperatorKind, Plan};

use crate::connectors::postgres::lookup::PostgresLookup;
use crate::error::Result;
use crate::operator::{BadRows, Operator, OperatorContext};

/// Builds operator `index` of `plan`, restoring its state from `ctx`; `None` for sources and sinks.
pub async fn build(plan: &Plan, index: usize, ctx: OperatorContext) -> Result<Option<Box<dyn Operator>>> {
    let op = &plan.operators[index];
    let metrics = &ctx.metrics;
    Ok(match &op.kind {
        OperatorKind::Transform { filter, projection, bad_records, dead_letter_path } => {
            let bad_rows = BadRows::open("transform", &op.name, *bad_records, dead_letter_path, metrics)?;
            Some(Box::new(transform::Transform::new(filter.clone(), projection.clone()).with_bad_rows(bad_rows)))
        }
        OperatorKind::Window(w) => {
            let bad_rows = BadRows::open("window", &op.name, w.bad_records, &w.dead_letter_path, metrics)?;
            Some(Box::new(window::Window::open(w.clone(), plan.max_parallelism, plan.state.backend, ctx)?.with_bad_rows(bad_rows)))
        }
        OperatorKind::Lookup { options, on, columns, remember } => {
            let lookup = PostgresLookup::connect(options, *on, columns, metrics.clone()).await?;
            Some(Box::new(lookup.remembering(remember.as_ref(), plan.state.backend, plan.max_parallelism, &ctx)?))
        }
        OperatorKind::Source { .. } | OperatorKind::Sink { .. } => None,
    })
}
