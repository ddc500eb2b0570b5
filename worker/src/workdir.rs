//! The worker's local directory: task state (RocksDB) and checkpoint scratch files, all of which
//! can be rebuilt from checkpoint storage. A worker holds a lock on its directory while it runs, and
//! empties it at start: what is there was left by a worker that died (a `kill -9` runs no cleanup).
//! Workers started with the default location share one parent folder, and each also removes the
//! folders of dead workers there, whose random ids will never come back.

use std::fs::File;
use std::path::Path;

/// Name of the lock file inside a worker's directory.
const LOCK: &str = "LOCK";

/// A worker's claim on its local directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
}

/// Claims `dir` for this worker: creates it, locks it (refused while another live worker holds
/// it) and removes whatever an earlier worker left in it.
pub fn claim(dir: &Path) -> anyhow::Result<Claim> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the state directory {}: {e}; pick another with --state-dir", dir.display()))?;
    let lock = open_lock(dir).map_err(|e| anyhow::anyhow!("cannot open {}: {e}; pick another --state-dir", dir.join(LOCK).display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another worker is using the state directory {}; stop it, or give this one another --state-dir (or --id)",
            dir.display()
        )
    })?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != LOCK {
            remove(&entry.path())?;
        }
    }
    Ok(Claim { _lock: lock })
}

/// Removes the folders in `parent` other than `own` whose worker is dead (their lock is free).
/// Folders without a lock file are not a worker's, and stay. Returns how many were removed.
pub fn sweep_dead(parent: &Path, own: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path == own || !path.join(LOCK).is_file() {
            continue;
        }
        let Ok(lock) = open_lock(&path) else { continue };
        if lock.try_lock().is_ok() {
            match remove(&path) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a dead worker's state directory"),
            }
        }
    }
    removed
}

fn open_lock(dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK))
}

fn remove(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker killed with `kill -9` leaves its folder behind: the next worker in that folder
    /// empties it, and one started beside it removes it, while a live worker's folder stays.
    #[test]
    fn dead_workers_state_is_removed_and_live_workers_state_is_kept() {
        let parent = std::env::temp_dir().join(format!("eddy-workdir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let (live, dead, own, other) = (parent.join("live"), parent.join("dead"), parent.join("own"), parent.join("not-a-worker"));
        let live_claim = claim(&live).unwrap();
        std::fs::write(live.join("state"), b"x").unwrap();
        drop(claim(&dead).unwrap()); // its process died
        std::fs::create_dir_all(dead.join("job/1/0.0")).unwrap();
        std::fs::create_dir_all(&other).unwrap();

        let e = claim(&live).unwrap_err().to_string();
        assert!(e.contains("another worker is using the state directory"), "{e}");
        assert!(live.join("state").exists(), "a refused claim removes nothing");

        let _own = claim(&own).unwrap();
        assert_eq!(sweep_dead(&parent, &own), 1);
        assert!(!dead.exists() && live.join("state").exists() && other.exists() && own.exists());

        // The same folder claimed again after its worker died: emptied.
        drop(live_claim);
        let _again = claim(&live).unwrap();
        assert!(!live.join("state").exists());
        let _ = std::fs::remove_dir_all(&parent);
    }
}
