//! Loading a derpMap to probe: from a file, a plain-HTTP URL (e.g. the operator's
//! `/derpmap.json`) or a key of the operator's ConfigMap (through `kubectl`), then parsing it
//! with [`crate::derpmap`] and selecting regions. Used by the `derpprobe` binary.
//!
//! Does not own: the map model and its formats ([`crate::derpmap`]), or command-line
//! validation of where the map comes from (the binary's).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};

use crate::derpmap::{DerpMap, MapFormat, parse_map};

/// Limit for fetching a map over HTTP or running kubectl.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a derpMap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    /// A file; `.hujson` implies the policy format, `.yaml`/`.yml` headscale's.
    File(PathBuf),
    /// A plain `http://` URL.
    Url(String),
    /// A key of a ConfigMap, read with `kubectl get configmap -o json`.
    ConfigMap {
        /// Namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
        /// The data key; `None` = the key of the requested format, else the first of
        /// `derpmap.json`, `policy.hujson`, `headscale.yaml` present.
        key: Option<String>,
    },
}

/// How to run kubectl for [`MapSource::ConfigMap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubectl {
    /// The kubectl executable.
    pub program: PathBuf,
    /// `--kubeconfig`, when given.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`, when given.
    pub context: Option<String>,
}

/// A loaded, parsed and filtered derpMap.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedMap {
    /// The map (only the selected regions).
    pub map: DerpMap,
    /// The format it was read as.
    pub format: MapFormat,
    /// Where it came from, as errors and reports name it (`path`, URL,
    /// `configmap ns/name key k`).
    pub source: String,
}

/// Reads `source`, parses it as `format` (else the format its file extension or ConfigMap key
/// implies, else auto-detected, [`parse_map`]) and keeps the regions `regions` selects
/// ([`DerpMap::filter_regions`]). Errors name the source and the line or field.
pub async fn load_map(
    source: &MapSource,
    format: Option<MapFormat>,
    regions: &[String],
    kubectl: &Kubectl,
) -> Result<LoadedMap, String> {
    let (text, source, implied) = match source {
        MapSource::File(p) => {
            let text = tokio::fs::read_to_string(p)
                .await
                .map_err(|e| format!("reading {}: {e}", p.display()))?;
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            let implied = match ext {
                "hujson" => Some(MapFormat::Policy),
                "yaml" | "yml" => Some(MapFormat::Headscale),
                _ => None,
            };
            (text, p.display().to_string(), implied)
        }
        MapSource::Url(u) => {
            let text = tokio::time::timeout(FETCH_TIMEOUT, http_get(u))
                .await
                .map_err(|_| format!("{u}: no answer within {FETCH_TIMEOUT:?}"))??;
            (text, u.clone(), None)
        }
        MapSource::ConfigMap {
            namespace,
            name,
            key,
        } => read_configmap(kubectl, format, namespace, name, key.as_deref()).await?,
    };
    let format = format.or(implied);
    let (map, format) = parse_map(&text, format, &source).map_err(|e| e.to_string())?;
    let map = map
        .filter_regions(regions)
        .map_err(|e| format!("{source}: {e}"))?;
    Ok(LoadedMap {
        map,
        format,
        source,
    })
}

/// Reads a ConfigMap with kubectl; returns (text, source name, format implied by the key).
/// Without `key`, the key of `format`, else the first of the three published keys present.
async fn read_configmap(
    kubectl: &Kubectl,
    format: Option<MapFormat>,
    namespace: &str,
    name: &str,
    key: Option<&str>,
) -> Result<(String, String, Option<MapFormat>), String> {
    let mut cmd = tokio::process::Command::new(&kubectl.program);
    if let Some(k) = &kubectl.kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    if let Some(c) = &kubectl.context {
        cmd.arg("--context").arg(c);
    }
    cmd.args(["get", "configmap", name, "-n", namespace, "-o", "json"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let what = format!("configmap {namespace}/{name}");
    let out = tokio::time::timeout(FETCH_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{what}: kubectl did not finish within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| format!("{what}: running {}: {e}", kubectl.program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: kubectl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{what}: kubectl printed invalid JSON: {e}"))?;
    let data = v
        .get("data")
        .and_then(|d| d.as_object())
        .ok_or_else(|| format!("{what}: the ConfigMap has no data"))?;
    let candidates: Vec<String> = match (key, format) {
        (Some(k), _) => vec![k.to_owned()],
        (None, Some(f)) => vec![f.configmap_key().to_owned()],
        (None, None) => [MapFormat::Json, MapFormat::Policy, MapFormat::Headscale]
            .iter()
            .map(|f| f.configmap_key().to_owned())
            .collect(),
    };
    for k in &candidates {
        if let Some(text) = data.get(k).and_then(|t| t.as_str()) {
            let implied = [MapFormat::Json, MapFormat::Policy, MapFormat::Headscale]
                .into_iter()
                .find(|f| f.configmap_key() == k);
            return Ok((text.to_owned(), format!("{what} key {k}"), implied));
        }
    }
    let have: Vec<&String> = data.keys().collect();
    Err(format!(
        "{what}: none of the keys {candidates:?} exists (keys: {have:?})"
    ))
}

/// `GET url` over plain HTTP/1.1 (no TLS, no redirects); the body of a 2xx answer as text.
/// Errors name the URL. The caller bounds the time (see [`FETCH_TIMEOUT`]).
pub async fn http_get(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let host_for_connect = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((host_for_connect.as_str(), port))
        .await
        .map_err(|e| format!("{url}: connecting: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "derpprobe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "{url}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    String::from_utf8(body.to_vec()).map_err(|_| format!("{url}: the body is not UTF-8"))
}
