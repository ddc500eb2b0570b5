//! Where checkpoint files live in checkpoint storage: written by the workers, read and collected by
//! the coordinator. One place for both, so the two never disagree on a path.
//!
//! ```text
//! <job>/chk-<id>/_manifest.pb                 the manifest of checkpoint <id> (the coordinator's)
//! <job>/chk-<id>/<task>/op<op>/<name>         a task's own files of checkpoint <id>
//! <job>/shared/<instance>/chk-<id>/<name>     an immutable file (RocksDB's .sst) of one state
//!                                             instance, uploaded once, for checkpoint <id>, and
//!                                             referenced by the later checkpoints that still hold it
//! ```

/// The folder of checkpoint `id` of `job`: its manifest and the tasks' own files.
pub fn checkpoint_dir(job: &str, id: u64) -> String {
    format!("{job}/chk-{id}")
}

/// The manifest of checkpoint `id` of `job`.
pub fn manifest(job: &str, id: u64) -> String {
    format!("{job}/chk-{id}/_manifest.pb")
}

/// A file task `task` wrote for operator `op` in checkpoint `id`.
pub fn task_file(job: &str, id: u64, task: &str, op: usize, name: &str) -> String {
    format!("{job}/chk-{id}/{task}/op{op}/{name}")
}

/// The folder of every shared (immutable, uploaded once) file of `job`.
pub fn shared_dir(job: &str) -> String {
    format!("{job}/shared")
}

/// The folder of one state instance's shared files.
pub fn shared_instance(job: &str, instance: &str) -> String {
    format!("{job}/shared/{instance}")
}

/// A shared file of the instance folder `instance_dir`, first uploaded for checkpoint `id`.
pub fn shared_file(instance_dir: &str, id: u64, name: &str) -> String {
    format!("{instance_dir}/chk-{id}/{name}")
}

/// The checkpoint a folder name (`chk-<id>`) stands for.
pub fn checkpoint_of_folder(name: &str) -> Option<u64> {
    name.strip_prefix("chk-")?.parse().ok()
}

/// The checkpoint a shared file was first uploaded for (see [`shared_file`]); `None` for a path
/// of another shape, such as files of the layout before shared files named their checkpoint.
pub fn uploaded_for(path: &str) -> Option<u64> {
    let mut parts = path.rsplit('/');
    parts.next()?;
    checkpoint_of_folder(parts.next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_back() {
        let instance = shared_instance("job", "a1");
        assert_eq!(uploaded_for(&shared_file(&instance, 7, "000010.sst")), Some(7));
        assert_eq!(uploaded_for("job/shared/a1/000009.sst"), None, "the older layout names no checkpoint");
        assert_eq!(manifest("job", 3), format!("{}/_manifest.pb", checkpoint_dir("job", 3)));
        assert_eq!(task_file("job", 3, "1.0", 2, "MANIFEST-000005"), "job/chk-3/1.0/op2/MANIFEST-000005");
        assert_eq!(checkpoint_of_folder("chk-12"), Some(12));
        assert_eq!(checkpoint_of_folder("shared"), None);
    }
}
