//! What a checkpoint's manifest says of the plan it was taken of, and how a savepoint's state
//! goes to another plan: the job's spec edited since (stages added, removed, reordered) or its
//! parallelism changed.

use std::collections::HashMap;

use eddy_jobs::plan::{Operator, OperatorKind};
use eddy_jobs::Plan;
use eddy_proto::CheckpointManifest;

/// Stamps `manifest` (every task acked) with the job and the plan's operators: their
/// parallelism, names and kinds, by which a later plan finds its state.
pub fn describe(manifest: &mut CheckpointManifest, job_id: &str, plan: &Plan) {
    manifest.job_id = job_id.to_string();
    manifest.parallelism = plan.operators.iter().enumerate().map(|(i, o)| (i as u32, o.parallelism)).collect();
    manifest.operator_names = plan.operators.iter().enumerate().map(|(i, o)| (i as u32, o.name.clone())).collect();
    manifest.operator_kinds = plan.operators.iter().enumerate().map(|(i, o)| (i as u32, kind_of(o))).collect();
}

/// What an operator is, as recorded in manifests: a savepoint's state only goes to a stage of the
/// same name and kind.
fn kind_of(o: &Operator) -> String {
    use OperatorKind as K;
    match &o.kind {
        K::Source { connector, .. } => format!("source:{}", connector.name()),
        K::Sink { connector } => format!("sink:{}", connector.name()),
        K::Transform { .. } => "transform".into(),
        K::Window(_) => "window".into(),
        K::Lookup { .. } => "lookup".into(),
    }
}

/// A savepoint's state addressed to `plan`'s operators, matched by stage name (a stable id, as
/// Flink's operator uid): a spec edited since (a stage added, removed or reordered) still gets
/// each stage's own state. A stage whose state has no stage of the same name and kind to go to is
/// refused, naming it; a new stage starts empty. Savepoints taken before names were recorded
/// match by position.
pub fn state_for_plan(manifest: &CheckpointManifest, plan: &Plan) -> Result<CheckpointManifest, String> {
    if manifest.operator_names.is_empty() {
        if manifest.parallelism.keys().any(|o| *o as usize >= plan.operators.len()) {
            return Err("it was taken of a job with other stages; submit the spec it was taken from".into());
        }
        return Ok(manifest.clone());
    }
    let holds_state = |op: u32| manifest.tasks.values().any(|t| t.operators.iter().any(|s| s.operator == op));
    let mut to_new = HashMap::new();
    for (old, name) in &manifest.operator_names {
        let kind = manifest.operator_kinds.get(old).cloned().unwrap_or_default();
        match plan.operators.iter().position(|o| &o.name == name) {
            Some(new) if kind.is_empty() || kind_of(&plan.operators[new]) == kind => {
                to_new.insert(*old, new as u32);
            }
            Some(new) if holds_state(*old) => {
                return Err(format!(
                    "stage `{name}` was a {kind} when the savepoint was taken and is a {} now; give the new stage another name",
                    kind_of(&plan.operators[new])
                ));
            }
            None if holds_state(*old) => {
                return Err(format!(
                    "it holds state of stage `{name}` ({kind}), which the spec no longer has; keep a stage of that name, or submit without the savepoint"
                ));
            }
            _ => {}
        }
    }
    let mut out = manifest.clone();
    out.parallelism = manifest.parallelism.iter().filter_map(|(old, p)| Some((*to_new.get(old)?, *p))).collect();
    out.operator_names = manifest.operator_names.iter().filter_map(|(old, n)| Some((*to_new.get(old)?, n.clone()))).collect();
    out.operator_kinds = manifest.operator_kinds.iter().filter_map(|(old, k)| Some((*to_new.get(old)?, k.clone()))).collect();
    for task in out.tasks.values_mut() {
        task.operators.retain_mut(|s| match to_new.get(&s.operator) {
            Some(new) => {
                s.operator = *new;
                true
            }
            None => false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::tests::SPEC;

    #[test]
    fn savepoint_state_follows_stage_names_across_spec_edits() {
        let before = eddy_jobs::compile(SPEC).unwrap();
        // A transform inserted before the window moves the window to another index.
        let edited = SPEC.replace(
            "[[window]]\nname = \"w\"\ninput = \"events\"",
            "[[transform]]\nname = \"kept\"\ninput = \"events\"\nwhere = \"k > 0\"\n[[window]]\nname = \"w\"\ninput = \"kept\"",
        );
        let after = eddy_jobs::compile(&edited).unwrap();
        let index = |plan: &Plan, name: &str| plan.operators.iter().position(|o| o.name == name).unwrap() as u32;
        assert_ne!(index(&before, "w"), index(&after, "w"), "the edit must move the window");
        let snapshot = |op: u32| eddy_proto::OperatorSnapshot { operator: op, inline: vec![op as u8], ..Default::default() };
        let manifest = CheckpointManifest {
            job_id: "j".into(),
            checkpoint_id: 1,
            parallelism: before.operators.iter().enumerate().map(|(i, o)| (i as u32, o.parallelism)).collect(),
            tasks: [
                ("0.0".to_string(), eddy_proto::TaskSnapshot { operators: vec![snapshot(index(&before, "events"))], ..Default::default() }),
                ("1.0".to_string(), eddy_proto::TaskSnapshot { operators: vec![snapshot(index(&before, "w"))], ..Default::default() }),
            ]
            .into_iter()
            .collect(),
            operator_names: before.operators.iter().enumerate().map(|(i, o)| (i as u32, o.name.clone())).collect(),
            operator_kinds: before.operators.iter().enumerate().map(|(i, o)| (i as u32, kind_of(o))).collect(),
        };
        let moved = state_for_plan(&manifest, &after).unwrap();
        let window_state = &moved.tasks["1.0"].operators[0];
        assert_eq!(window_state.operator, index(&after, "w"));
        assert_eq!(window_state.inline, vec![index(&before, "w") as u8], "the window's own state");
        assert_eq!(moved.parallelism.get(&index(&after, "w")), Some(&4));
        // A spec without the window cannot take its state; the error names the stage.
        let without = "name = \"t\"\n[[source]]\nname = \"events\"\nconnector = \"generator\"\noptions = { keys = 10 }\n[[sink]]\nname = \"out\"\ninput = \"events\"\nconnector = \"discard\"\n";
        let e = state_for_plan(&manifest, &eddy_jobs::compile(without).unwrap()).unwrap_err();
        assert!(e.contains("`w`") && e.contains("window"), "{e}");
    }
}
