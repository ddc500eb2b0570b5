//! What the worker's tests share: the real services they talk to, and temporary directories.

/// Held by a test while it uses the ClickHouse server (some stop it).
pub static CLICKHOUSE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `query` on the ClickHouse server at `url` and returns its answer as tab-separated text.
pub async fn clickhouse_sql(url: &str, query: &str) -> String {
    use clickhouse::{Client, Compression};
    let client = Client::default().with_url(url).with_validation(false).with_compression(Compression::None);
    let bytes = client.query(query).fetch_bytes("TabSeparated").unwrap().collect().await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A fresh directory under the system's temp dir, named after `label`, removed when dropped.
pub fn temp_dir(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("eddy-{label}-")).tempdir().expect("creating a temporary directory")
}

/// Whether the services are known to run (`EDDY_TEST_REQUIRE_SERVICES`, set by the README's test
/// command once it has started them): a test that finds one missing then fails instead of skipping.
pub fn services_required() -> bool {
    std::env::var_os("EDDY_TEST_REQUIRE_SERVICES").is_some()
}

/// The setting `var` names (a real service's address, or the services script) for a test that
/// needs it. When it is unset the test is skipped and says so, unless `EDDY_TEST_REQUIRE_SERVICES`
/// is set, as the README's test command sets it once it has started every service: then a missing
/// setting fails the test instead of letting it pass without having run.
pub fn service(var: &str, example: &str) -> Option<String> {
    if let Ok(value) = std::env::var(var) {
        return Some(value);
    }
    if services_required() {
        panic!("{var} is not set, yet EDDY_TEST_REQUIRE_SERVICES says the services are running: set {var}={example}");
    }
    eprintln!("skipped: set {var}={example} to run against the real service");
    None
}

/// The `eddy-mock-api` binary: `EDDY_TEST_MOCK_API_BIN`, or the one built next to this test.
pub fn mock_api_bin() -> Option<std::path::PathBuf> {
    let bin = std::env::var_os("EDDY_TEST_MOCK_API_BIN").map(std::path::PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.parent()?.join("eddy-mock-api"))
    });
    match bin {
        Some(b) if b.is_file() => Some(b),
        _ if crate::testing::services_required() => {
            panic!("no eddy-mock-api binary next to the tests: build it first (cargo build -p eddy-demo) or set EDDY_TEST_MOCK_API_BIN")
        }
        _ => {
            eprintln!("skipped: build the mock first (cargo build -p eddy-demo) or set EDDY_TEST_MOCK_API_BIN");
            None
        }
    }
}

/// A running mock API on a free loopback port; killed on drop.
pub struct MockApi {
    _child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl MockApi {
    /// Starts the mock with `args`, on a port it picks.
    pub async fn start(bin: &std::path::Path, args: &[&str]) -> MockApi {
        let mut child = tokio::process::Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
        let line = lines.next_line().await.unwrap().unwrap();
        let addr = line.rsplit(' ').next().unwrap().to_string();
        MockApi { _child: child, base: format!("http://{addr}") }
    }

    /// GETs `path` as JSON.
    pub async fn get(&self, path: &str) -> serde_json::Value {
        let text = reqwest::get(format!("{}{path}", self.base)).await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap()
    }
}
