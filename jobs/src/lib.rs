//! The job-spec model of Eddy: a declarative TOML file describing sources, transforms, windows and
//! sinks is parsed ([`spec`]), validated and type-checked — SQL expressions included ([`expr`]) — and
//! planned into a graph of chained, partitioned tasks ([`plan`]).
#![warn(missing_docs)]

pub mod condition;
pub mod connectors;
pub mod expr;
pub mod plan;
pub mod postgres;
pub mod reach;
pub mod spec;
pub mod time;
pub mod types;

pub use plan::{plan, Plan, TaskId};
pub use spec::{substitute_env, substitute_worker_env, worker_references, JobSpec};
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
    /// A new error about `field`. A message that quotes much of a large spec (a select list of
    /// thousands of columns, say) keeps its start and its end, where the fault is named, so that
    /// it stays readable and fits in a gRPC status.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError { field: bounded(field.into()), message: bounded(message.into()) }
    }
}

/// Characters of an error message kept at most: its start and its end.
const MESSAGE_HEAD: usize = 700;
const MESSAGE_TAIL: usize = 500;

/// `text`, or its first and last characters with the number left out between them.
fn bounded(text: String) -> String {
    let chars = text.chars().count();
    if chars <= MESSAGE_HEAD + MESSAGE_TAIL + 40 {
        return text;
    }
    let head: String = text.chars().take(MESSAGE_HEAD).collect();
    let tail: String = text.chars().skip(chars - MESSAGE_TAIL).collect();
    format!("{head} … [{} characters left out] … {tail}", chars - MESSAGE_HEAD - MESSAGE_TAIL)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_about_huge_specs_quote_a_bounded_excerpt() {
        // A 200 KB select list naming an unknown column: the error quotes it, bounded.
        let huge = format!("x{}", "y".repeat(200_000));
        let spec = format!(
            "name = \"big\"\n[[source]]\nname = \"events\"\nconnector = \"generator\"\noptions = {{ count = 1 }}\n[[transform]]\nname = \"t\"\ninput = \"events\"\nselect = \"k, {huge}\"\n[[sink]]\nname = \"out\"\ninput = \"t\"\nconnector = \"discard\"\n"
        );
        let e = compile(&spec).unwrap_err();
        let text = e.to_string();
        assert!(text.len() < 4_000, "{} bytes", text.len());
        assert!(e.field.starts_with("transform[t]"), "{e:?}");
        assert!(text.contains("characters left out"), "{text}");
    }

    #[test]
    fn a_spec_with_45000_select_columns_compiles() {
        // About 1 MB; the duplicate-name check used to compare every pair of names (minutes in a
        // debug build, inside the coordinator's loop).
        let select: Vec<String> = (0..45_000).map(|i| format!("k + {i} AS column_number_{i}")).collect();
        let spec = format!(
            "name = \"wide\"\n[[source]]\nname = \"events\"\nconnector = \"generator\"\noptions = {{ count = 1 }}\n[[transform]]\nname = \"t\"\ninput = \"events\"\nselect = \"{}\"\n[[sink]]\nname = \"out\"\ninput = \"t\"\nconnector = \"discard\"\n",
            select.join(", ")
        );
        assert!(spec.len() > 1_000_000, "{} bytes", spec.len());
        let plan = compile(&spec).unwrap();
        assert_eq!(plan.operators[1].schema.fields.len(), 45_000);
        let dup = spec.replace("AS column_number_44999", "AS COLUMN_NUMBER_7");
        assert!(compile(&dup).unwrap_err().to_string().contains("duplicate output name"));
    }
}
