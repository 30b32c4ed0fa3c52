//! The Helm chart (`charts/kubederp`) through the real `helm` binary: a `helm` command pointed
//! at the shared control plane with private, empty config/cache/data directories (no
//! repositories, no OCI registry, nothing fetched), `helm template` parsed into JSON documents,
//! and lookups in those documents.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use crate::command::ok;
use crate::k8s::{ControlPlane, workspace_root};

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/kubederp")
}

/// Empty helm home (config, cache, data) shared by the tests of one test binary.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| tempfile::tempdir().expect("helm home tempdir"))
        .path()
}

/// `helm` pointed at `cp`, with no repositories or registries configured.
pub fn helm(cp: &ControlPlane) -> Command {
    let home = helm_home();
    let mut cmd = Command::new(cp.bin_dir().join("helm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("HELM_REGISTRY_CONFIG", home.join("registry.json"))
        .env("HELM_REPOSITORY_CONFIG", home.join("repositories.yaml"))
        .stdin(Stdio::null());
    cmd
}

/// `helm template <release> charts/kubederp --namespace <ns>` with `--set` for each of `sets`,
/// parsed into one JSON value per document.
pub async fn render(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> Vec<Value> {
    let mut cmd = helm(cp);
    cmd.args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", ns]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    parse_docs(&ok(cmd).await)
}

/// Every non-empty document of a multi-document YAML stream, as JSON.
pub fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| {
            let v = <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML parses");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The document of `kind` named `name`; panics when none was rendered.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// `Kind/name` of every document, sorted.
pub fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    k.sort();
    k
}
