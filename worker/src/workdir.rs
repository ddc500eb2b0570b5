//! The worker's local directory: task state (RocksDB) and checkpoint scratch files, all of which
//! can be rebuilt from checkpoint storage. A worker holds a lock on its directory while it runs, and
//! empties it at start: what is there was left by a worker that died (a `kill -9` runs no cleanup).
//! A directory is only ever emptied when its lock file says a worker made it: a `--state-dir`
//! pointed by mistake at a folder with other files in it is refused, not wiped. Workers started
//! with the default location share one parent folder, and each also removes the folders of dead
//! workers there, whose random ids will never come back.

use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Name of the lock file inside a worker's directory; its presence marks the directory as one a
/// worker made, which a later worker may empty.
const LOCK: &str = "eddy-worker.lock";
/// How often a claim retries when the directory was swept away between opening and locking.
const CLAIM_ATTEMPTS: usize = 5;

/// A worker's claim on its local directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
}

/// Claims `dir` for this worker: creates it, locks it (refused while another live worker holds
/// it) and removes whatever an earlier worker left in it. A directory with files in it but no
/// worker's lock file is refused untouched.
pub fn claim(dir: &Path) -> anyhow::Result<Claim> {
    for _ in 0..CLAIM_ATTEMPTS {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the state directory {}: {e}; pick another with --state-dir", dir.display()))?;
        let marked = dir.join(LOCK).is_file();
        if !marked && std::fs::read_dir(dir)?.next().is_some() {
            anyhow::bail!(
                "the state directory {} has files in it and is not a worker's (no {LOCK}); a worker empties its directory at start, \
                 so point --state-dir at an empty or new directory",
                dir.display()
            );
        }
        let lock =
            open_lock(dir).map_err(|e| anyhow::anyhow!("cannot open {}: {e}; pick another --state-dir", dir.join(LOCK).display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => anyhow::bail!(
                "another worker is using the state directory {}; stop it, or give this one another --state-dir (or --id)",
                dir.display()
            ),
            Err(TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {e}; pick a --state-dir on a local file system", dir.join(LOCK).display())
            }
        }
        // A sweep by another worker may have moved the directory away while this one waited for
        // the lock: the lock then guards a file that is no longer at `dir`. Start over.
        if !same_file(&lock, &dir.join(LOCK)) {
            continue;
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name() != LOCK {
                remove(&entry.path())?;
            }
        }
        return Ok(Claim { _lock: lock });
    }
    anyhow::bail!("the state directory {} keeps being removed by another worker; give this one another --state-dir", dir.display())
}

/// Removes the folders in `parent` other than `own` whose worker is dead (their lock is free).
/// Folders without a worker's lock file stay. A dead worker's folder is first renamed, under its
/// lock, so that a worker restarting into it at that moment gets a fresh folder, never a half
/// removed one. Returns how many were removed.
pub fn sweep_dead(parent: &Path, own: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(TRASH) {
            // Left by a sweep that died halfway, or being removed by another one right now.
            let _ = std::fs::remove_dir_all(&path);
            continue;
        }
        if path == own || !path.join(LOCK).is_file() {
            continue;
        }
        let Ok(lock) = open_lock(&path) else { continue };
        if lock.try_lock().is_err() || !same_file(&lock, &path.join(LOCK)) {
            continue;
        }
        let trash = parent.join(format!("{TRASH}{}-{}", entry.file_name().to_string_lossy(), uuid::Uuid::new_v4().simple()));
        let gone = std::fs::rename(&path, &trash).and_then(|()| {
            drop(lock);
            std::fs::remove_dir_all(&trash)
        });
        match gone {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a dead worker's state directory"),
        }
    }
    removed
}

/// Prefix of a folder on its way out: no worker's id, so no claim picks it up.
const TRASH: &str = ".removing-";

/// Whether the open `file` is the one at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    let (Ok(a), Ok(b)) = (file.metadata(), std::fs::metadata(path)) else { return false };
    a.dev() == b.dev() && a.ino() == b.ino()
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
        let tmp = crate::testing::temp_dir("workdir");
        let parent = tmp.path();
        let (live, dead, own, other) = (parent.join("live"), parent.join("dead"), parent.join("own"), parent.join("not-a-worker"));
        let live_claim = claim(&live).unwrap();
        std::fs::write(live.join("state"), b"x").unwrap();
        drop(claim(&dead).unwrap()); // its process died
        std::fs::create_dir_all(dead.join("job/1/0.0")).unwrap();

        // A folder that is not a worker's is never emptied, whatever --state-dir says.
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        let e = claim(&other).unwrap_err().to_string();
        assert!(e.contains("is not a worker's"), "{e}");
        assert!(other.join("notes.txt").exists());
        // A sweep that died halfway leaves a folder on its way out; the next sweep finishes it.
        let half_removed = parent.join(format!("{TRASH}old-1234"));
        std::fs::create_dir_all(half_removed.join("job")).unwrap();

        let e = claim(&live).unwrap_err().to_string();
        assert!(e.contains("another worker is using the state directory"), "{e}");
        assert!(live.join("state").exists(), "a refused claim removes nothing");

        let _own = claim(&own).unwrap();
        assert_eq!(sweep_dead(parent, &own), 1);
        assert!(!dead.exists() && !half_removed.exists());
        assert!(live.join("state").exists() && other.join("notes.txt").exists() && own.exists());

        // The same folder claimed again after its worker died: emptied.
        drop(live_claim);
        let _again = claim(&live).unwrap();
        assert!(!live.join("state").exists());
    }
}
