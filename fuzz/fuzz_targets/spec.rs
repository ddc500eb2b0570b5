//! Job specs as a user (or anyone holding the cluster's secret) may submit them: substitution,
//! parsing, validation and planning never panic; a spec is accepted or refused with an error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(text) = eddy_jobs::substitute_env(text, |name| (name.len() % 2 == 0).then(|| name.to_lowercase())) {
        let _ = eddy_jobs::compile(&text);
        let _ = eddy_jobs::substitute_worker_env(&text, |_| None);
    }
});
