//! The job-spec model of Eddy: a declarative TOML file describing sources, transforms, windows and
//! sinks is parsed ([`spec`]), validated and type-checked — SQL expressions included ([`expr`]) — and
//! planned into a graph of chained, partitioned tasks ([`plan`]).
#![warn(missing_docs)]

pub mod connectors;
pub mod expr;
pub mod plan;
pub mod spec;
pub mod time;
pub mod types;

pub use plan::{plan, Plan, TaskId};
pub use spec::{substitute_env, JobSpec};
pub use types::{DataType, Field, Row, Schema, Value};

/// A spec error: the field at fault (a dotted path such as `window[hop].slide`) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct SpecError {
    /// Dotted path of the offending field; empty when the error is not about one field.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl SpecError {
    /// A new error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError { field: field.into(), message: message.into() }
    }
}

/// Parses, validates and plans a spec's text (already substituted).
pub fn compile(text: &str) -> Result<Plan, SpecError> {
    plan(&JobSpec::parse(text)?)
}

/// Like [`compile`], with the job's default parallelism replaced by `parallelism` when given (a
/// rescale): every stage that sets no parallelism of its own runs with it.
pub fn compile_with_parallelism(text: &str, parallelism: Option<u32>) -> Result<Plan, SpecError> {
    let mut spec = JobSpec::parse(text)?;
    if parallelism.is_some() {
        spec.parallelism = parallelism;
    }
    plan(&spec)
}
