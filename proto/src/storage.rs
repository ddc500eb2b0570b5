//! Checkpoint storage as a user names it: a directory (or a `file://` URL) that every process
//! reaches at the same path, or `s3://bucket/prefix` on any S3-compatible store. For S3 the
//! credentials, region and endpoint come from the environment as the AWS tools read them
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, and
//! `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint). The coordinator opens it and tells the workers
//! the canonical name ([`CheckpointStorage::url`]); each worker opens that with its own environment.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

/// Opened checkpoint storage.
#[derive(Clone, Debug)]
pub struct CheckpointStorage {
    /// The canonical name the workers are told: an absolute directory, or `s3://bucket/prefix`.
    pub url: String,
    /// Paths in it are those of [`crate::layout`].
    pub store: Arc<dyn ObjectStore>,
}

/// Opens checkpoint storage named `name`; a local directory is created when missing. The error
/// says what to fix.
pub fn open(name: &str) -> Result<CheckpointStorage, String> {
    if let Some(rest) = name.strip_prefix("s3://") {
        return open_s3(name, rest);
    }
    if name.contains("://") && !name.starts_with("file://") {
        return Err(format!("checkpoint storage `{name}`: unknown scheme; use a directory, file:///path or s3://bucket/prefix"));
    }
    let dir = name.strip_prefix("file://").unwrap_or(name);
    let fail = |e: &dyn std::fmt::Display| {
        format!("checkpoint storage `{name}`: {e}; check the path and its permissions, or pick another (--checkpoint-dir)")
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| fail(&e))?;
    // Deleting a folder's last file removes the folder too (collection deletes whole checkpoints).
    let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| fail(&e))?.with_automatic_cleanup(true);
    Ok(CheckpointStorage { url: dir.to_string_lossy().into_owned(), store: Arc::new(store) })
}

fn open_s3(name: &str, rest: &str) -> Result<CheckpointStorage, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    if bucket.is_empty() {
        return Err(format!("checkpoint storage `{name}` names no bucket: write s3://bucket/prefix"));
    }
    let s3 = AmazonS3Builder::from_env().with_bucket_name(bucket).build().map_err(|e| {
        format!("checkpoint storage `{name}`: {e}; set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and, for a store other than AWS, AWS_ENDPOINT")
    })?;
    let store: Arc<dyn ObjectStore> = if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
    let url = if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
    Ok(CheckpointStorage { url, store })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_as_a_user_writes_them() {
        let dir = std::env::temp_dir().join(format!("eddy-storage-{}", std::process::id()));
        let plain = open(dir.to_str().unwrap()).unwrap();
        let as_url = open(&format!("file://{}", dir.display())).unwrap();
        assert_eq!(plain.url, as_url.url);
        assert!(std::path::Path::new(&plain.url).is_absolute());
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(open("s3://bucket/some/prefix/").unwrap().url, "s3://bucket/some/prefix");
        assert_eq!(open("s3://bucket").unwrap().url, "s3://bucket");
        assert!(open("s3:///prefix").unwrap_err().contains("names no bucket"));
        assert!(open("gs://bucket/x").unwrap_err().contains("unknown scheme"));
    }
}
