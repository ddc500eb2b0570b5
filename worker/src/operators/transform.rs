//! Filter and projection with SQL expressions.

use eddy_jobs::expr::Expr;
use eddy_jobs::Value;

use super::{Collector, Operator};
use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// `SELECT projection FROM input WHERE filter`, row by row.
pub struct Transform {
    filter: Option<Expr>,
    projection: Option<Vec<Expr>>,
}

impl Transform {
    /// A transform; `None` parts pass rows through.
    pub fn new(filter: Option<Expr>, projection: Option<Vec<Expr>>) -> Transform {
        Transform { filter, projection }
    }
}

#[async_trait::async_trait]
impl Operator for Transform {
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        let mut result = Batch::with_capacity(batch.len());
        for (row, op) in batch.rows.into_iter().zip(batch.ops) {
            if let Some(f) = &self.filter {
                match f.eval(&row) {
                    Ok(Value::Bool(true)) => {}
                    Ok(_) => continue,
                    Err(e) => return Err(TaskError::user(format!("`where` failed on a row: {e}"))),
                }
            }
            let row = match &self.projection {
                None => row,
                Some(exprs) => exprs
                    .iter()
                    .map(|e| e.eval(&row))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| TaskError::user(format!("`select` failed on a row: {e}")))?,
            };
            result.push(row, op);
        }
        if !result.is_empty() {
            out.main.push(result);
        }
        Ok(())
    }
}
