//! The chart's alert rules and Grafana dashboard only name metrics that exist: every
//! `derper_*` name must be served on the admin port of a real `derper` process (started in
//! pinned TLS mode, so the certificate gauge is registered) or be one of the relay's labelled
//! families (which appear once they have a child), every `derp_operator_*` name must be in the
//! operator's registry (built the way `derp-operator` builds it), and the only other metric
//! used, from kube-state-metrics, is listed here on purpose.
//!
//! promtool checks the rules' syntax and alert logic separately (`scripts/test`,
//! `deploy/monitoring/prometheus-rules.test.yaml`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use derp_tests::admin_http;
use derp_tests::bins::workspace_bin;
use derp_tests::k8s::workspace_root;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Metrics the rules or the dashboard take from outside kubederp.
const EXTERNAL: &[&str] = &["kube_pod_container_status_restarts_total"];

/// Series names a Prometheus text exposition can produce: from each `# TYPE name kind` line
/// (so families without samples yet count too) and from every sample line.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every identifier in `expr` that looks like one of our metric names or a kube-state-metrics
/// one (label names never start with these prefixes here).
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let quoted = start > 0 && (bytes[start - 1] == b'"' || bytes[start - 1] == b'$');
            if !quoted
                && (word.starts_with("derper_")
                    || word.starts_with("derp_operator_")
                    || word.starts_with("kube_"))
            {
                out.push(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Scrapes `/metrics` of a real `derper` (pinned self-signed TLS, STUN, admin on loopback).
async fn scrape_derper() -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(workspace_bin("derper"))
        .args(["-hostname=127.0.0.1", "-certmode=manual", "-certdir"])
        .arg(dir.path())
        .args([
            "-a=127.0.0.1:0",
            "-http-port=0",
            "-stun-port=0",
            "-admin-addr=127.0.0.1:0",
            "-c",
        ])
        .arg(dir.path().join("derper.key"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let admin = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("listening on") && l.contains("listener=\"admin\"") {
                let addr = l.split("listening on ").nth(1).unwrap();
                return addr.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("derper exited before its admin listener was up");
    })
    .await
    .expect("derper logs its admin address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (status, body) = admin_http::get(admin.as_str(), "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    drop(child);
    body
}

fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// The relay's registry as `derper` builds it, with one child in every labelled family: a
/// family without children is not in the exposition at all (a fresh process has refused
/// nobody yet), but its name is what the rules must use.
fn derper_families_exposition() -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("derper");
    let m = derper::metrics::Metrics::register(&mut registry);
    let _stun = derper::stun::StunMetrics::register(&mut registry);
    m.admission_rejection("test");
    m.handshake_failure("test");
    m.disconnect("test");
    m.http_request("test");
    encode(&registry)
}

/// The operator's registry as `derp-operator` builds it, every labelled family with a child.
fn operator_exposition() -> String {
    use derp_operator::metrics::{
        ConditionLabels, ErrorLabels, Metrics, NodeLabels, ProbeResultLabels,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let m = Metrics::new(&mut registry);
    m.reconcile_errors
        .get_or_create(&ErrorLabels { reason: "test" })
        .inc();
    m.write("Pod", "apply");
    m.probes
        .get_or_create(&ProbeResultLabels { result: "ok" })
        .inc();
    let node = NodeLabels {
        region: "ns/r".into(),
        node: "n".into(),
    };
    m.probe_success.get_or_create(&node).set(1);
    m.probe_latency.get_or_create(&node).set(0.1);
    m.probe_timestamp.get_or_create(&node).set(1.0);
    m.region_condition
        .get_or_create(&ConditionLabels {
            region: "ns/r".into(),
            condition: "Ready".into(),
        })
        .set(1);
    encode(&registry)
}

/// `(where, expr)` of every PromQL expression in the rules file and the dashboard.
fn shipped_exprs() -> Vec<(String, String)> {
    let files = workspace_root().join("charts/kubederp/files");
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(files.join("prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(files.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    fn walk(v: &Value, out: &mut Vec<(String, String)>, title: &str) {
        match v {
            Value::Object(m) => {
                let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push((format!("panel {title:?}"), e.clone()));
                }
                if let Some(Value::Object(q)) = m.get("query")
                    && let Some(Value::String(e)) = q.get("query")
                {
                    out.push((format!("variable {title:?}"), e.clone()));
                }
                for v in m.values() {
                    walk(v, out, title);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out, title)),
            _ => {}
        }
    }
    walk(&dash, &mut out, "dashboard");
    out
}

#[tokio::test]
async fn rules_and_dashboard_use_only_metrics_the_binaries_expose() {
    let mut exposed = exposed_names(&scrape_derper().await);
    assert!(
        exposed.contains("derper_cert_not_after_seconds"),
        "TLS mode registers the certificate gauge: {exposed:?}"
    );
    exposed.extend(exposed_names(&derper_families_exposition()));
    exposed.extend(exposed_names(&operator_exposition()));
    assert!(exposed.contains("derp_operator_region_condition"));
    exposed.extend(EXTERNAL.iter().map(|s| (*s).to_owned()));

    let exprs = shipped_exprs();
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, expr) in &exprs {
        let names = metric_names_in(expr);
        assert!(!names.is_empty(), "{place}: no metric found in {expr:?}");
        for n in names {
            if !exposed.contains(&n) {
                missing.push(format!("{place}: {n}"));
            }
            used.insert(n);
        }
    }
    assert!(missing.is_empty(), "metrics nobody exposes: {missing:#?}");
    // the alerts' inputs are all there
    for want in [
        "derper_cert_not_after_seconds",
        "derper_mesh_peers_up",
        "derper_mesh_peers_configured",
        "derper_admission_rejections_total",
        "derp_operator_region_condition",
        "kube_pod_container_status_restarts_total",
    ] {
        assert!(used.contains(want), "{want} unused: {used:?}");
    }
}

#[test]
fn metric_name_extraction_finds_names_and_skips_labels_and_strings() {
    assert_eq!(
        metric_names_in(
            r#"sum by (region) (rate(derper_bytes_sent_total{region=~"$region"}[5m])) - derp_operator_x"#
        ),
        ["derper_bytes_sent_total", "derp_operator_x"]
    );
    assert_eq!(
        metric_names_in(r#"up{job="derper_x"}"#),
        Vec::<String>::new()
    );
    let names = exposed_names(
        "# HELP derper_accepts x\n# TYPE derper_accepts counter\n# TYPE h histogram\n\
         derper_up{a=\"b\"} 1\n# EOF\n",
    );
    for n in ["derper_accepts_total", "h_bucket", "h_count", "derper_up"] {
        assert!(names.contains(n), "{n}: {names:?}");
    }
    assert!(!names.contains("derper_accepts"));
}
