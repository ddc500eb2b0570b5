//! What the worker's tests share: the real services they talk to, and temporary directories.

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
