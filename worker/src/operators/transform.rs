//! Filter and projection with SQL expressions. A row the expressions fail on (a CAST that cannot
//! convert, an integer overflow, a division by zero where SQL says so) follows the stage's
//! `bad_records`: dropped (the default) or set aside in the dead letters, counted either way and
//! logged, or the job fails. A row fails the same way as an insert and as a retraction, so a
//! dropped insert is never retracted later.

use eddy_jobs::expr::Expr;
use eddy_jobs::Value;

use crate::batch::Batch;
use crate::error::Result;
use crate::operator::{set_aside, BadRows, Collector, Operator, Stage};

/// `SELECT projection FROM input WHERE filter`, row by row.
pub struct Transform {
    filter: Option<Expr>,
    projection: Option<Vec<Expr>>,
    bad_rows: Option<BadRows>,
}

impl Transform {
    /// A transform; `None` parts pass rows through. A row the expressions fail on fails the task
    /// unless [`Transform::with_bad_rows`] says otherwise.
    pub fn new(filter: Option<Expr>, projection: Option<Vec<Expr>>) -> Transform {
        Transform { filter, projection, bad_rows: None }
    }

    /// Rows the expressions fail on follow the stage's `bad_records` policy.
    pub fn with_bad_rows(mut self, bad_rows: BadRows) -> Transform {
        self.bad_rows = Some(bad_rows);
        self
    }
}

impl Stage for Transform {}

#[async_trait::async_trait]
impl Operator for Transform {
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        let mut result = Batch::with_capacity(batch.len());
        for (row, op) in batch.rows.into_iter().zip(batch.ops) {
            if let Some(f) = &self.filter {
                match f.eval(&row) {
                    Ok(Value::Bool(true)) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        set_aside(&mut self.bad_rows, &row, format!("`where` failed on a row: {e}"))?;
                        continue;
                    }
                }
            }
            let row = match &self.projection {
                None => row,
                Some(exprs) => match exprs.iter().map(|e| e.eval(&row)).collect::<std::result::Result<Vec<_>, _>>() {
                    Ok(projected) => projected,
                    Err(e) => {
                        set_aside(&mut self.bad_rows, &row, format!("`select` failed on a row: {e}"))?;
                        continue;
                    }
                },
            };
            result.push(row, op);
        }
        if !result.is_empty() {
            out.main.push(result);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use eddy_jobs::connectors::BadRecordPolicy;
    use eddy_jobs::{DataType, Field, Schema};

    use super::*;
    use crate::operator::{DeadLetters, TaskMetrics};

    #[tokio::test]
    async fn rows_the_select_fails_on_are_set_aside_and_the_rest_goes_on() {
        let schema = Schema::new(vec![Field::new("s", DataType::String)]);
        let select = Expr::compile("CAST(s AS BIGINT)", &schema).unwrap();
        let tmp = crate::testing::temp_dir("transform-dead");
        let dir = tmp.path();
        let path = dir.join("dead.jsonl");
        let metrics = Arc::new(TaskMetrics::default());
        let letters = DeadLetters::open("transform", path.to_str(), metrics.clone()).unwrap();
        let bad_rows = BadRows::new("transform", "casted", BadRecordPolicy::DeadLetter, letters);
        let mut t = Transform::new(None, Some(vec![select.clone()])).with_bad_rows(bad_rows);
        let rows = ["1", "two", "3"].iter().map(|s| vec![Value::string(s)]).collect();
        let mut out = Collector::default();
        t.process_batch(Batch::inserts(rows), &mut out).await.unwrap();
        assert_eq!(out.main[0].rows, vec![vec![Value::Int(1)], vec![Value::Int(3)]]);
        assert_eq!(metrics.dead_lettered.load(Ordering::Relaxed), 1);
        let letter: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(letter["stage"], "casted");
        assert_eq!(letter["row"], serde_json::json!(["two"]));
        assert!(letter["error"].as_str().unwrap().contains("select"), "{letter}");

        // Without a policy (or with `fail`) the row fails the task, as the user's error.
        let mut strict = Transform::new(None, Some(vec![select]));
        let e = strict.process_batch(Batch::inserts(vec![vec![Value::string("x")]]), &mut Collector::default()).await.unwrap_err();
        assert_eq!(e.blame, crate::error::Blame::User);
    }
}
