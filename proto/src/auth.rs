//! The cluster's shared secret: every gRPC call between Eddy's processes (the CLI's job API, a
//! worker's control stream, the data exchange between workers, raft between coordinators) carries
//! it, and a process that has one refuses calls without it.
//!
//! The secret travels as a bearer token in each call's metadata, compared in constant time. A
//! token rather than mutual TLS: one value to hand to every process (a file, or the environment),
//! no certificate authority to run, and the same check on every listener. What it does not give
//! is secrecy on the wire: on a network others can read, turn on [`Tls`] (certificates from
//! files) as well, or the token and the data cross it in the clear.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable naming a file that holds the secret (preferred: it shows in no
/// process listing or environment dump).
pub const SECRET_FILE_VAR: &str = "EDDY_SECRET_FILE";
/// The environment variable holding the secret itself.
pub const SECRET_VAR: &str = "EDDY_SECRET";
/// Fewest characters a secret may have.
const MIN_LEN: usize = 16;
const HEADER: &str = "authorization";

/// How to make a secret, for the messages that ask for one.
pub const HOW_TO_SET: &str = "create one with `(umask 077; head -c 32 /dev/urandom | base64 > eddy.secret)` and give every \
     coordinator, worker and `eddy` command EDDY_SECRET_FILE=eddy.secret (or the value itself in EDDY_SECRET)";

/// A cluster secret. Its `Debug` shows no part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// A secret from its text (surrounding whitespace, such as a file's last newline, dropped):
    /// at least 16 visible ASCII characters, so that it fits a header and is not guessed.
    pub fn new(text: &str) -> Result<Secret, String> {
        let text = text.trim();
        if text.len() < MIN_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("a cluster secret is at least {MIN_LEN} visible ASCII characters, without spaces; {HOW_TO_SET}"));
        }
        Ok(Secret(text.into()))
    }

    /// The secret in `file` if given, else in the file named by `EDDY_SECRET_FILE`, else in
    /// `EDDY_SECRET`; none if neither is set.
    pub fn load(file: Option<&std::path::Path>) -> Result<Option<Secret>, String> {
        let file = file.map(std::path::PathBuf::from).or_else(|| std::env::var_os(SECRET_FILE_VAR).map(Into::into));
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("cannot read the cluster secret from {}: {e}", path.display()))?;
            return Secret::new(&text).map(Some).map_err(|e| format!("{}: {e}", path.display()));
        }
        match std::env::var(SECRET_VAR) {
            Ok(text) => Secret::new(&text).map(Some).map_err(|e| format!("{SECRET_VAR}: {e}")),
            Err(_) => Ok(None),
        }
    }

    /// Whether `given` is this secret, in time that does not depend on where they differ.
    fn matches(&self, given: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        ours.len() == given.len() && ours.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// What a process presents on its calls: the cluster's secret, if it has one.
#[derive(Clone, Debug, Default)]
pub struct Credentials(pub Option<Secret>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.0 {
            let value = format!("Bearer {}", secret.0).parse().map_err(|_| Status::internal("the cluster secret is not a valid header"))?;
            request.metadata_mut().insert(HEADER, value);
        }
        Ok(request)
    }
}

/// What a listener lets in: calls carrying the cluster's secret, or any call when it has none.
#[derive(Clone, Debug, Default)]
pub struct Guard(pub Option<Secret>);

impl Guard {
    /// Refuses to serve `address` beyond this host without a secret: anyone who reached it could
    /// run jobs, join as a worker or feed rows into running jobs.
    pub fn check_listen(&self, address: std::net::SocketAddr) -> Result<(), String> {
        if self.0.is_none() && !address.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on {address} without a cluster secret: anyone who reaches it could submit jobs, join as a \
                 worker or inject rows. Listen on 127.0.0.1, or {HOW_TO_SET}"
            ));
        }
        Ok(())
    }
}

impl Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = &self.0 else { return Ok(request) };
        match request.metadata().get(HEADER).map(|v| v.as_bytes().strip_prefix(b"Bearer ")) {
            Some(Some(given)) if secret.matches(given) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong cluster secret: give this caller the secret the cluster was started with (EDDY_SECRET_FILE or EDDY_SECRET)",
            )),
            None => Err(Status::unauthenticated(
                "this Eddy cluster requires its secret: give this caller EDDY_SECRET_FILE (a file holding the secret) or EDDY_SECRET",
            )),
        }
    }
}

/// TLS on Eddy's listeners and connections, from PEM files: a process serves with its
/// certificate and key, and connects to peers whose certificates the given CA signed (over
/// `https`). Off when no files are given.
#[derive(Clone, Default)]
pub struct Tls {
    server: Option<tonic::transport::ServerTlsConfig>,
    client: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("serves", &self.server.is_some()).field("verifies", &self.client.is_some()).finish()
    }
}

impl Tls {
    /// TLS from a certificate and key to serve with (both or neither) and a CA certificate to
    /// check peers with; the error names the file and what is wrong with it.
    pub fn load(cert: Option<&std::path::Path>, key: Option<&std::path::Path>, ca: Option<&std::path::Path>) -> Result<Tls, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
        };
        let server = match (cert, key) {
            (Some(cert), Some(key)) => {
                let config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert, "certificate")?, read(key, "key")?));
                // Parsed now, so that a bad file stops the start with its name.
                tonic::transport::Server::builder().tls_config(config.clone()).map_err(|e| {
                    format!("the TLS certificate {} and key {} do not make an identity: {e}", cert.display(), key.display())
                })?;
                Some(config)
            }
            (None, None) => None,
            _ => return Err("a TLS certificate and its key go together: give both (--tls-cert and --tls-key, PEM files)".into()),
        };
        let client = match ca {
            Some(ca) => {
                let pem = read(ca, "CA certificate")?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("the TLS CA certificate {} holds no PEM certificate", ca.display()));
                }
                Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            }
            None => None,
        };
        Ok(Tls { server, client })
    }

    /// Whether this process serves TLS.
    pub fn serves(&self) -> bool {
        self.server.is_some()
    }

    /// Whether this process reaches its peers over TLS.
    pub fn verifies(&self) -> bool {
        self.client.is_some()
    }
}

/// How a process takes part in a cluster's security: the secret it presents and requires, and
/// TLS when configured.
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub secret: Option<Secret>,
    pub tls: Tls,
}

impl Access {
    /// What a process's settings give: the secret (see [`Secret::load`]) and TLS files.
    pub fn load(
        secret_file: Option<&std::path::Path>,
        tls_cert: Option<&std::path::Path>,
        tls_key: Option<&std::path::Path>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<Access, String> {
        Ok(Access { secret: Secret::load(secret_file)?, tls: Tls::load(tls_cert, tls_key, tls_ca)? })
    }

    /// What this process presents on its calls.
    pub fn credentials(&self) -> Credentials {
        Credentials(self.secret.clone())
    }

    /// What this process's listeners let in.
    pub fn guard(&self) -> Guard {
        Guard(self.secret.clone())
    }

    /// A gRPC server for one of Eddy's processes (see [`crate::server`]), with TLS if configured.
    pub fn server(&self) -> Result<tonic::transport::Server, String> {
        let server = crate::server();
        match &self.tls.server {
            Some(config) => server.tls_config(config.clone()).map_err(|e| format!("TLS: {e}")),
            None => Ok(server),
        }
    }

    /// A connection to `endpoint` made on its first call (and again after a failure), pinging its
    /// server and presenting this process's secret on every call.
    pub fn connect_lazy(&self, endpoint: tonic::transport::Endpoint) -> Authed {
        authed(crate::with_keepalive(endpoint).connect_lazy(), &self.credentials())
    }

    /// An endpoint for `address` (`host:port` or a URL): over TLS, checked against the CA, when
    /// one is configured.
    pub fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, String> {
        let scheme = if self.tls.client.is_some() { "https" } else { "http" };
        if self.tls.client.is_some() && address.starts_with("http://") {
            // Plain text would carry the secret in the clear to a cluster meant to be private.
            return Err(format!("`{address}` is plain HTTP, but TLS is on (a CA is given): write https:// or host:port"));
        }
        let url = if address.contains("://") { address.to_string() } else { format!("{scheme}://{address}") };
        let endpoint = tonic::transport::Endpoint::from_shared(url).map_err(|e| format!("not an address ({e})"))?;
        match &self.tls.client {
            Some(config) => endpoint.tls_config(config.clone()).map_err(|e| format!("TLS: {e}")),
            None => Ok(endpoint),
        }
    }
}

/// A server process's security settings, as flags and `EDDY_*` variables (the coordinator's and
/// the worker's alike).
#[derive(clap::Args, Debug)]
pub struct AccessArgs {
    /// A file holding the cluster's secret: presented on this process's calls and required of
    /// every call to it (or set EDDY_SECRET to the secret itself).
    #[arg(long, env = "EDDY_SECRET_FILE")]
    pub secret_file: Option<std::path::PathBuf>,
    /// TLS on this process's listener: its certificate (PEM), with --tls-key.
    #[arg(long, env = "EDDY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "EDDY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed the other processes' certificates: this one then
    /// reaches them over TLS.
    #[arg(long, env = "EDDY_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl AccessArgs {
    /// The secret and TLS these settings name; the error says which file is wrong and how.
    pub fn load(&self) -> Result<Access, String> {
        Access::load(self.secret_file.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref(), self.tls_ca.as_deref())
    }
}

/// What went wrong in TLS, if `error` (or an error behind it) is a TLS failure: a handshake, or a
/// certificate refused.
pub fn tls_fault(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("certificate") || text.contains("tls") || text.contains("TLS") || text.contains("handshake") {
            return Some(text);
        }
        source = e.source();
    }
    None
}

/// A connection that presents the cluster's secret on every call.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

/// `channel`, presenting `credentials` on every call.
pub fn authed(channel: tonic::transport::Channel, credentials: &Credentials) -> Authed {
    tonic::service::interceptor::InterceptedService::new(channel, credentials.clone())
}

/// `service`, serving only calls that `guard` lets in.
pub fn guarded<S>(service: S, guard: &Guard) -> tonic::service::interceptor::InterceptedService<S, Guard> {
    tonic::service::interceptor::InterceptedService::new(service, guard.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("0123456789abcdef-secret\n").unwrap()
    }

    #[test]
    fn a_call_passes_only_with_the_secret() {
        let mut guard = Guard(Some(secret()));
        let signed = Credentials(Some(secret())).call(Request::new(())).unwrap();
        assert!(guard.call(signed).is_ok());
        let missing = guard.call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("requires its secret"), "{}", missing.message());
        let other = Credentials(Some(Secret::new("another-secret-of-ours").unwrap())).call(Request::new(())).unwrap();
        assert!(guard.call(other).unwrap_err().message().contains("wrong cluster secret"));
        // Without a secret a listener lets anything in (loopback only, see below).
        assert!(Guard(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn short_or_spaced_secrets_are_refused_and_debug_hides_them() {
        assert!(Secret::new("short").unwrap_err().contains("at least 16"));
        assert!(Secret::new("has a space in the middle").is_err());
        assert_eq!(format!("{:?}", Credentials(Some(secret()))), "Credentials(Some(Secret(***)))");
    }

    #[test]
    fn with_tls_on_a_plain_http_address_is_refused_and_a_ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("eddy-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, key) = (dir.join("ca.pem"), dir.join("key.pem"));
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let tls = Tls::load(None, None, Some(&ca)).unwrap();
        assert!(tls.verifies() && !tls.serves());
        let access = Access { secret: Some(secret()), tls };
        let e = access.endpoint("http://10.0.0.1:6123").unwrap_err();
        assert!(e.contains("plain HTTP, but TLS is on"), "{e}");
        assert_eq!(access.endpoint("10.0.0.1:6123").unwrap().uri().scheme_str(), Some("https"));
        let e = Tls::load(None, None, Some(&key)).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        assert!(Tls::load(Some(&ca), None, None).unwrap_err().contains("go together"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_loopback_listens_without_a_secret() {
        let open = Guard(None);
        assert!(open.check_listen("127.0.0.1:6123".parse().unwrap()).is_ok());
        assert!(open.check_listen("[::1]:6123".parse().unwrap()).is_ok());
        let e = open.check_listen("0.0.0.0:6123".parse().unwrap()).unwrap_err();
        assert!(e.contains("EDDY_SECRET_FILE"), "{e}");
        assert!(Guard(Some(secret())).check_listen("0.0.0.0:6123".parse().unwrap()).is_ok());
    }
}
