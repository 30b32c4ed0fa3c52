//! Locating the workspace's own binaries (`derper`, `derp-operator`, `crdgen`, …) for tests that
//! run them as processes.
//!
//! `KUBEDERP_BIN_DIR` wins when set (the test script builds every binary once and sets it);
//! otherwise the binary's package is built with `cargo build --locked` on first use, into the
//! same target directory the tests were built in.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Environment variable naming a directory with prebuilt workspace binaries.
pub const BIN_DIR_ENV: &str = "KUBEDERP_BIN_DIR";

/// The package that owns a binary of this workspace.
fn package_of(bin: &str) -> &'static str {
    match bin {
        "derp-operator" | "crdgen" => "derp-operator",
        _ => "derper",
    }
}

/// Path of the workspace binary `name`, building it first when needed. Panics with the build
/// error when it cannot be built: a test that needs it must not silently skip.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.is_file(),
            "{BIN_DIR_ENV} is set but {} does not exist",
            path.display()
        );
        return path;
    }
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = crate::k8s::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--locked",
            "-q",
            "-p",
            package_of(name),
            "--bin",
            name,
        ])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {name}: {e}"));
    assert!(status.success(), "cargo build --bin {name} failed");
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    path
}
