//! Worker configuration: defaults, then environment (`EDDY_*`), then flags (see `main.rs`).

/// What a worker needs to know to join a cluster.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique id of this worker.
    pub worker_id: String,
    /// Coordinator `host:port` (or a full `http://` URL); for replicated coordinators several,
    /// comma-separated (the worker finds the leader among them).
    pub coordinator: String,
    /// Task slots offered (parallel pipelines this worker runs).
    pub slots: u32,
    /// `host:port` other workers reach this worker's data service on.
    pub advertised_address: String,
    /// Local directory for task state (RocksDB) and checkpoint scratch files.
    pub state_dir: std::path::PathBuf,
    /// The cluster's secret and TLS: the secret is presented to the coordinator and other
    /// workers, and required of whoever opens a data stream to this one (none: loopback only,
    /// nothing required).
    pub access: eddy_proto::Access,
    /// Directories whose files jobs may read or write (file sources and sinks, dead letters).
    pub allowed_dirs: Vec<std::path::PathBuf>,
    /// Hosts jobs may connect to (`name`, or `*.domain` for any name under it); empty: any.
    pub allowed_hosts: Vec<String>,
    /// Environment variables a job's `${worker:NAME}` may read; no other.
    pub job_env: Vec<String>,
}

impl WorkerConfig {
    /// The coordinators listed.
    pub fn coordinators(&self) -> Vec<String> {
        eddy_proto::address_list(&self.coordinator)
    }

    /// The directory jobs may use when a worker is given none: `eddy` in the system's temporary
    /// directory.
    pub fn default_allowed_dir() -> std::path::PathBuf {
        std::env::temp_dir().join("eddy")
    }

    /// Checks that a job reaches only files in the allowed directories and, when hosts are
    /// listed, only those hosts; the error names the field and says how to allow it.
    pub fn permits(&self, reach: &eddy_jobs::reach::Reach) -> Result<(), String> {
        for (field, path) in &reach.files {
            if !self.allowed_dirs.iter().any(|dir| inside(std::path::Path::new(path), dir)) {
                let dirs = self.allowed_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
                return Err(format!(
                    "{field}: `{path}` is outside the directories this worker lets jobs use ({dirs}); give an absolute \
                     path under one of them (no `..`), or start the worker with --allow-dir DIR (EDDY_ALLOW_DIRS)"
                ));
            }
        }
        if self.allowed_hosts.is_empty() {
            return Ok(());
        }
        for (field, endpoint) in &reach.endpoints {
            for host in hosts(endpoint).map_err(|e| format!("{field}: {e}"))? {
                if !self.allowed_hosts.iter().any(|allowed| host_matches(allowed, &host)) {
                    return Err(format!(
                        "{field}: host `{host}` is not among the hosts this worker lets jobs reach ({}); add it to the \
                         worker's --allow-hosts (EDDY_ALLOW_HOSTS)",
                        self.allowed_hosts.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The hosts `endpoint` connects to, read as the client that connects reads it.
fn hosts(endpoint: &eddy_jobs::reach::Endpoint) -> Result<Vec<String>, String> {
    use eddy_jobs::reach::Endpoint;
    let bare = |host: &str| host.trim_start_matches('[').trim_end_matches(']').to_string();
    match endpoint {
        Endpoint::Url(url) => {
            let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
            Ok(vec![bare(parsed.host_str().ok_or("a URL without a host")?)])
        }
        Endpoint::Postgres(url) => {
            let config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL connection string ({e})"))?;
            let mut hosts = Vec::new();
            for host in config.get_hosts() {
                match host {
                    tokio_postgres::config::Host::Tcp(name) => hosts.push(bare(name)),
                    tokio_postgres::config::Host::Unix(path) => {
                        return Err(format!("a Unix socket ({}) is no host this worker can allow; give a host name", path.display()))
                    }
                }
            }
            hosts.extend(config.get_hostaddrs().iter().map(|a| a.to_string()));
            Ok(hosts)
        }
        Endpoint::Brokers(list) => Ok(list
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(|b| {
                let b = b.split_once("://").map_or(b, |(_, rest)| rest);
                match b.strip_prefix('[') {
                    Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
                    None => b.rsplit_once(':').map_or(b, |(host, _)| host).to_string(),
                }
            })
            .collect()),
    }
}

/// Whether `path`, absolute and without `..`, lies in `dir` once the symbolic links of the part
/// that exists are resolved (a link leading out, or nowhere, is outside).
fn inside(path: &std::path::Path, dir: &std::path::Path) -> bool {
    if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
        return false;
    }
    // The longest part that exists (a dangling link counts: it would be followed on create),
    // with its links resolved, then the rest as written.
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while existing.symlink_metadata().is_err() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.pop()) {
            (Some(name), true) => rest.push(name),
            _ => return false,
        }
    }
    let Ok(mut resolved) = existing.canonicalize() else { return false };
    resolved.extend(rest.iter().rev());
    dir.canonicalize().is_ok_and(|dir| resolved.starts_with(dir))
}

/// Whether `host` is `allowed`, or under it when `allowed` is `*.domain` (letter case and IPv6
/// brackets aside).
fn host_matches(allowed: &str, host: &str) -> bool {
    let allowed = allowed.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    match allowed.strip_prefix("*.") {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => allowed == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, hosts: &[&str]) -> WorkerConfig {
        WorkerConfig {
            worker_id: "w".into(),
            coordinator: String::new(),
            slots: 1,
            advertised_address: String::new(),
            state_dir: dir.into(),
            access: eddy_proto::Access::default(),
            allowed_dirs: vec![dir.join("jobs")],
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            job_env: Vec::new(),
        }
    }

    fn files(paths: &[&str]) -> eddy_jobs::reach::Reach {
        let files = paths.iter().map(|p| ("sink[out].options.path".to_string(), p.to_string())).collect();
        eddy_jobs::reach::Reach { files, endpoints: Vec::new() }
    }

    #[test]
    fn files_outside_the_allowed_directories_are_refused_however_they_are_spelled() {
        let tmp = tempfile::tempdir().unwrap();
        let jobs = tmp.path().join("jobs");
        std::fs::create_dir_all(jobs.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc", jobs.join("link")).unwrap();
        let c = config(tmp.path(), &[]);
        let ok = format!("{}/out/new/file.jsonl", jobs.display());
        assert_eq!(c.permits(&files(&[&ok])), Ok(()));
        let dotted = format!("{}/out/./x.jsonl", jobs.display());
        assert_eq!(c.permits(&files(&[&dotted])), Ok(()));
        std::os::unix::fs::symlink("/nonexistent-eddy-target", jobs.join("dangling")).unwrap();
        for bad in [
            "/etc/passwd".to_string(),
            format!("{}/../escape.jsonl", jobs.display()),
            format!("{}/out/../out/x.jsonl", jobs.display()),
            format!("{}/link/shadow", jobs.display()),
            format!("{}/link/../x", jobs.display()),
            format!("{}/dangling", jobs.display()),
            "relative.jsonl".to_string(),
        ] {
            let e = c.permits(&files(&[&bad])).unwrap_err();
            assert!(e.starts_with("sink[out].options.path:") && e.contains("--allow-dir"), "{bad}: {e}");
        }
    }

    #[test]
    fn hosts_are_checked_only_when_listed_and_read_as_the_clients_read_them() {
        use eddy_jobs::reach::Endpoint;
        let tmp = tempfile::tempdir().unwrap();
        let reach = |endpoint: Endpoint| eddy_jobs::reach::Reach {
            files: Vec::new(),
            endpoints: vec![("lookup[dims].options.url".to_string(), endpoint)],
        };
        let metadata = || Endpoint::Url("http://169.254.169.254/latest".into());
        assert_eq!(config(tmp.path(), &[]).permits(&reach(metadata())), Ok(()));
        let c = config(tmp.path(), &["127.0.0.1", "*.Example.com", "[::1]"]);
        for ok in [
            Endpoint::Url("http://user:pw@127.0.0.1:8080/x".into()),
            Endpoint::Url("https://api.example.COM/events".into()),
            Endpoint::Postgres("postgres://eddy@db.example.com:5432/eddy".into()),
            Endpoint::Postgres("host=127.0.0.1 user=eddy".into()),
            Endpoint::Brokers("k1.example.com:9092, [::1]:9093".into()),
        ] {
            assert_eq!(c.permits(&reach(ok.clone())), Ok(()), "{ok:?}");
        }
        for (bad, shown) in [
            (metadata(), "169.254.169.254"),
            (Endpoint::Url("http://evil.com\\@127.0.0.1/".into()), "evil.com"),
            (Endpoint::Url("http://example.com.evil.net/".into()), "example.com.evil.net"),
            (Endpoint::Postgres("postgres://eddy@127.0.0.1/db?host=evil.net".into()), "evil.net"),
            (Endpoint::Postgres("postgres://eddy@127.0.0.1/db?hostaddr=10.0.0.9".into()), "10.0.0.9"),
            (Endpoint::Brokers("k1.example.com:9092,evil.net:9092".into()), "evil.net"),
        ] {
            let e = c.permits(&reach(bad.clone())).unwrap_err();
            assert!(e.contains(&format!("host `{shown}`")) && e.contains("--allow-hosts"), "{bad:?}: {e}");
        }
        let e = c.permits(&reach(Endpoint::Postgres("host=/var/run/postgresql user=eddy".into()))).unwrap_err();
        assert!(e.contains("Unix socket"), "{e}");
    }
}
