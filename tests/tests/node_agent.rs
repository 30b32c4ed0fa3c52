//! Proves the local node agent against a real kube-apiserver (no operator): Node registration,
//! a hand-written host-network Pod run as a local process with expanded args/env (`$(VAR)`,
//! the `status.hostIP` fieldRef), Secret and ConfigMap volumes that follow their source objects,
//! readiness, captured logs, restarts, deletion, refusals naming the field (including every
//! feature the agent dropped because no relay Pod uses it), and no leaked processes.
//!
//! The "container" is `kubederp-test-container` (a bin of this crate), mapped from the image
//! `kubederp.test/test-container`. Each test uses its own node names and loopback IPs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use derp_tests::agent::{AgentConfig, NodeAgent, NodeSpec};
use derp_tests::k8s::{ControlPlane, TestNamespace, wait_for};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, LogParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const IMAGE: &str = "kubederp.test/test-container:dev";
const T: Duration = Duration::from_secs(20);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

async fn start_agent(
    client: &kube::Client,
    nodes: Vec<NodeSpec>,
) -> (NodeAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = AgentConfig::new(dir.path()).image(
        "kubederp.test/test-container",
        env!("CARGO_BIN_EXE_kubederp-test-container"),
    );
    config.restart_backoff = Duration::from_millis(300);
    config.resync = Duration::from_secs(1);
    config.heartbeat = Duration::from_secs(2);
    let agent = NodeAgent::start(client.clone(), config, nodes)
        .await
        .expect("start the node agent");
    (agent, dir)
}

/// A plain HTTP/1.0 GET; (status, body).
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

fn pod(name: &str, node: &str, extra: Value) -> Pod {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "agent-test"}},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": IMAGE}],
        },
    });
    merge(&mut p, extra);
    serde_json::from_value(p).expect("valid pod")
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

async fn pod_status(api: &Api<Pod>, name: &str) -> Option<Value> {
    let p = api.get_opt(name).await.ok()??;
    serde_json::to_value(p.status?).ok()
}

fn condition(status: &Value, type_: &str) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// Live (non-zombie) processes whose command line contains `needle`.
fn procs_with_arg(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle) && proc_alive(*pid)
        })
        .collect()
}

fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test]
async fn nodes_are_registered_ready_with_a_lease_and_go_not_ready_at_shutdown() {
    let client = ControlPlane::shared().client().await;
    let n1 = unique("agent-reg-a");
    let (agent, _dir) = start_agent(
        &client,
        vec![NodeSpec::new(&n1, Ipv4Addr::new(127, 0, 21, 1)).label("kubederp.io/relay", "true")],
    )
    .await;
    let nodes = Api::<Node>::all(client.clone());
    let node = nodes.get(&n1).await.unwrap();
    let labels = node.metadata.labels.clone().unwrap();
    assert_eq!(labels["kubederp.io/relay"], "true");
    assert_eq!(labels["kubernetes.io/hostname"], n1);
    let status = node.status.unwrap();
    let addrs: Vec<(String, String)> = status
        .addresses
        .unwrap()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addrs,
        [("InternalIP".to_owned(), "127.0.21.1".to_owned())],
        "{addrs:?}"
    );
    let ready = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert!(status.node_info.is_some());
    assert!(status.allocatable.unwrap().contains_key("pods"));
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        "kube-node-lease",
    )
    .get(&n1)
    .await
    .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(n1.as_str())
    );
    assert_eq!(agent.node_names(), vec![n1.clone()]);

    agent.shutdown().await;
    let ready = nodes
        .get(&n1)
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .unwrap();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    );
    nodes.delete(&n1, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn pod_runs_with_expanded_args_env_host_ip_and_live_volumes() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-run").await;
    let node = unique("agent-run");
    let ip = Ipv4Addr::new(127, 0, 22, 1);
    let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;

    let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name);
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s1"}, "stringData": {"tls.crt": "cert-v1", "token": "sekret"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "cm1"}, "data": {"peers": "peer-a\n", "level": "debug"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let p = pod(
        "relay",
        &node,
        json!({"spec": {
            "containers": [{
                "name": "main", "image": IMAGE,
                "args": [
                    "--listen=$(HOST_IP):$(PORT)",
                    "--ready-file=/data/ready",
                    "--cert=/certs/node.crt",
                    "--peers", "/etc/peers/peers",
                    "$$(NOT_EXPANDED)", "$(UNKNOWN)",
                ],
                "env": [
                    {"name": "PORT", "value": "28082"},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "ADMIN", "value": "$(HOST_IP):$(PORT)"},
                    {"name": "CERT_DIR", "value": "/certs"},
                ],
                "volumeMounts": [
                    {"name": "certs", "mountPath": "/certs", "readOnly": true},
                    {"name": "peers", "mountPath": "/etc/peers"},
                    {"name": "data", "mountPath": "/data"},
                ],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 28082}, "periodSeconds": 1},
            }],
            "volumes": [
                {"name": "certs", "secret": {"secretName": "s1", "defaultMode": 288,
                    "items": [{"key": "tls.crt", "path": "node.crt"}]}},
                {"name": "peers", "configMap": {"name": "cm1"}},
                {"name": "data", "emptyDir": {}},
            ],
        }}),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let addr = format!("{ip}:28082");

    let status = wait_for("pod Running", T, || async {
        let s = pod_status(&pods, "relay").await?;
        (s["phase"] == "Running" && s["containerStatuses"][0]["started"] == true).then_some(s)
    })
    .await;
    assert_eq!(status["hostIP"], ip.to_string());
    assert_eq!(status["podIP"], ip.to_string());
    assert!(status["startTime"].is_string());
    assert_eq!(condition(&status, "PodScheduled").as_deref(), Some("True"));
    assert_eq!(
        condition(&status, "Ready").as_deref(),
        Some("False"),
        "not ready until the ready file exists"
    );

    let (_, env) = wait_for("container HTTP", T, || http_get(&addr, "/env")).await;
    let env: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(env["HOST_IP"], "127.0.22.1");
    assert_eq!(env["POD_IP"], "127.0.22.1");
    assert_eq!(env["ADMIN"], "127.0.22.1:28082");
    assert!(
        env["CERT_DIR"].ends_with("/volumes/certs"),
        "{}",
        env["CERT_DIR"]
    );
    assert!(env.contains_key("PATH"));

    let (_, args) = http_get(&addr, "/args").await.unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[0], "--listen=127.0.22.1:28082");
    let ready_file = PathBuf::from(args[1].strip_prefix("--ready-file=").unwrap());
    assert!(ready_file.ends_with("volumes/data/ready"), "{args:?}");
    let cert = args[2].strip_prefix("--cert=").unwrap().to_owned();
    assert!(cert.ends_with("volumes/certs/node.crt"), "{args:?}");
    assert!(args[4].ends_with("volumes/peers/peers"), "{args:?}");
    assert_eq!(args[5], "$(NOT_EXPANDED)");
    assert_eq!(args[6], "$(UNKNOWN)");

    // Volume files, with items/defaultMode (0440 = 288), as the process sees them.
    let (code, body) = http_get(&addr, &format!("/file?path={cert}"))
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "cert-v1"));
    let mode = std::fs::metadata(&cert).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o440
    );
    let peers = args[4];
    assert_eq!(
        http_get(&addr, &format!("/file?path={peers}"))
            .await
            .unwrap()
            .1,
        "peer-a\n"
    );

    // Readiness follows the probe.
    std::fs::write(&ready_file, "").unwrap();
    wait_for("pod Ready", T, || async {
        let s = pod_status(&pods, "relay").await?;
        (condition(&s, "Ready").as_deref() == Some("True")
            && s["containerStatuses"][0]["ready"] == true)
            .then_some(())
    })
    .await;

    // Updates of the Secret and ConfigMap reach the files.
    secrets
        .patch(
            "s1",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"tls.crt": "cert-v2"}})),
        )
        .await
        .unwrap();
    cms.patch(
        "cm1",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"peers": "peer-a\npeer-b\n"}})),
    )
    .await
    .unwrap();
    wait_for("secret update projected", T, || async {
        let (_, body) = http_get(&addr, &format!("/file?path={cert}")).await?;
        (body == "cert-v2").then_some(())
    })
    .await;
    wait_for("configmap update projected", T, || async {
        let (_, body) = http_get(&addr, &format!("/file?path={peers}")).await?;
        (body == "peer-a\npeer-b\n").then_some(())
    })
    .await;

    // Logs are captured.
    let log = agent.log_path(&ns.name, "relay", "main");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("kubederp-test-container started"), "{text}");
    assert!(text.contains("arg: --listen=127.0.22.1:28082"), "{text}");
    // …and served to `kubectl logs` through the apiserver (the agent's kubelet endpoint).
    let logs = pods.logs("relay", &LogParams::default()).await.unwrap();
    assert!(logs.contains("kubederp-test-container started"), "{logs}");
    assert!(!logs.contains("=== kubederp-node-agent"), "{logs}");
    let tail = pods
        .logs(
            "relay",
            &LogParams {
                tail_lines: Some(1),
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tail.lines().count(), 1, "{tail}");

    // Deletion: the process goes away and the Pod object is removed.
    let pid = agent.container_pid(&ns.name, "relay", "main").unwrap();
    assert!(proc_alive(pid));
    pods.delete("relay", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("pod object removed", T, || async {
        pods.get_opt("relay").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!proc_alive(pid), "process {pid} still running");
    assert!(agent.pids().is_empty());

    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn crashed_container_is_restarted_and_counted() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-crash").await;
    let node = unique("agent-crash");
    let ip = Ipv4Addr::new(127, 0, 23, 1);
    let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let p = pod(
        "crashy",
        &node,
        json!({"spec": {"containers": [{
            "name": "main", "image": IMAGE, "args": ["--listen=127.0.23.1:28083"],
        }]}}),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let addr = "127.0.23.1:28083";
    let (_, pid1) = wait_for("container HTTP", T, || http_get(addr, "/pid")).await;
    // `kubectl logs -f` follows the file as the container writes to it.
    let follow = pods
        .log_stream(
            "crashy",
            &LogParams {
                follow: true,
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    let (code, _) = http_get(addr, "/exit?code=3").await.unwrap();
    assert_eq!(code, 200);
    let mut lines = futures::AsyncBufReadExt::lines(follow);
    let followed = tokio::time::timeout(T, async {
        while let Some(line) = futures::StreamExt::next(&mut lines).await {
            if line.unwrap().contains("exiting with 3 on request") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(followed, Ok(true), "followed log shows the exit");
    drop(lines);
    let status = wait_for("restarted", T, || async {
        let s = pod_status(&pods, "crashy").await?;
        let cs = &s["containerStatuses"][0];
        (cs["restartCount"] == 1 && cs["state"]["running"].is_object()).then_some(s)
    })
    .await;
    let cs = &status["containerStatuses"][0];
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(cs["lastState"]["terminated"]["reason"], "Error");
    let (_, pid2) = wait_for("container HTTP again", T, || http_get(addr, "/pid")).await;
    assert_ne!(pid1, pid2);
    // `kubectl logs --previous` shows the run that exited.
    let previous = pods
        .logs(
            "crashy",
            &LogParams {
                previous: true,
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert!(previous.contains("exiting with 3 on request"), "{previous}");
    let _ = http_get(addr, "/exit?code=0").await;
    wait_for("second restart", T, || async {
        let s = pod_status(&pods, "crashy").await?;
        (s["containerStatuses"][0]["restartCount"] == 2).then_some(())
    })
    .await;

    pods.delete("crashy", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("pods removed", T, || async {
        pods.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn unsupported_specs_are_refused_with_a_message_naming_the_field() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-refuse").await;
    let node = unique("agent-refuse");
    let (agent, _dir) = start_agent(
        &client,
        vec![NodeSpec::new(&node, Ipv4Addr::new(127, 0, 24, 1))],
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let cases = [
        (
            "no-hostnet",
            json!({"spec": {"hostNetwork": false}}),
            "spec.hostNetwork",
        ),
        (
            "hostpath",
            json!({"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}}),
            "spec.volumes[0].hostPath",
        ),
        (
            "unknown-image",
            json!({"spec": {"containers": [{"name": "main", "image": "example.com/nginx:1"}]}}),
            "spec.containers[0].image",
        ),
        (
            "init",
            json!({"spec": {"initContainers": [{"name": "i", "image": IMAGE}]}}),
            "spec.initContainers",
        ),
        (
            "other-command",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE, "command": ["sh"]}]}}),
            "spec.containers[0].command[0]",
        ),
        (
            "startup-probe",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "startupProbe": {"tcpSocket": {"port": 1}}}]}}),
            "spec.containers[0].startupProbe",
        ),
        // What the agent dropped because no relay Pod uses it is refused, not ignored.
        (
            "never",
            json!({"spec": {"restartPolicy": "Never"}}),
            "spec.restartPolicy",
        ),
        (
            "env-from",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "envFrom": [{"configMapRef": {"name": "x"}}]}]}}),
            "spec.containers[0].envFrom",
        ),
        (
            "secret-env",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "x", "key": "k"}}}]}]}}),
            "spec.containers[0].env[0].valueFrom.secretKeyRef",
        ),
        (
            "name-field-ref",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}),
            "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath",
        ),
        (
            "projected",
            json!({"spec": {"volumes": [{"name": "p", "projected": {"sources": [
                {"configMap": {"name": "x"}}]}}]}}),
            "spec.volumes[0].projected",
        ),
        (
            "downward",
            json!({"spec": {"volumes": [{"name": "d", "downwardAPI": {"items": [
                {"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}),
            "spec.volumes[0].downwardAPI",
        ),
        (
            "sub-path",
            json!({"spec": {
                "containers": [{"name": "main", "image": IMAGE,
                    "volumeMounts": [{"name": "e", "mountPath": "/e", "subPath": "x"}]}],
                "volumes": [{"name": "e", "emptyDir": {}}]}}),
            "spec.containers[0].volumeMounts[0].subPath",
        ),
        (
            "working-dir",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE, "workingDir": "/w"}]}}),
            "spec.containers[0].workingDir",
        ),
        (
            "liveness",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "livenessProbe": {"tcpSocket": {"port": 1}}}]}}),
            "spec.containers[0].livenessProbe",
        ),
        (
            "exec-probe",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "readinessProbe": {"exec": {"command": ["true"]}}}]}}),
            "spec.containers[0].readinessProbe.exec",
        ),
        (
            "named-port",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "ports": [{"name": "http", "containerPort": 28099}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}}}]}}),
            "spec.containers[0].readinessProbe.httpGet.port",
        ),
        (
            "probe-headers",
            json!({"spec": {"containers": [{"name": "main", "image": IMAGE,
                "readinessProbe": {"httpGet": {"path": "/", "port": 28099,
                    "httpHeaders": [{"name": "X", "value": "y"}]}}}]}}),
            "spec.containers[0].readinessProbe.httpGet.httpHeaders",
        ),
    ];
    for (name, extra, _) in &cases {
        pods.create(&PostParams::default(), &pod(name, &node, extra.clone()))
            .await
            .unwrap();
    }
    for (name, _, field) in &cases {
        let s = wait_for(&format!("{name} refused"), T, || async {
            let s = pod_status(&pods, name).await?;
            (s["phase"] == "Failed").then_some(s)
        })
        .await;
        assert_eq!(s["reason"], "UnsupportedPodSpec", "{name}: {s}");
        let msg = s["message"].as_str().unwrap();
        assert!(
            msg.contains(field),
            "{name}: message {msg:?} should name {field}"
        );
    }
    assert!(agent.pids().is_empty(), "nothing was started");
    // A refused Pod is still finalized on deletion.
    pods.delete("hostpath", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("refused pod removed", T, || async {
        pods.get_opt("hostpath").await.ok()?.is_none().then_some(())
    })
    .await;
    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn dropping_or_shutting_down_the_agent_leaves_no_processes() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-stop").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    for (i, graceful) in [(1u8, false), (2u8, true)] {
        let node = unique("agent-stop");
        let ip = Ipv4Addr::new(127, 0, 25, i);
        let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;
        let name = format!("p{i}");
        let p = pod(
            &name,
            &node,
            json!({"spec": {"containers": [{
                "name": "main", "image": IMAGE, "args": [format!("--listen={ip}:28085")],
            }]}}),
        );
        pods.create(&PostParams::default(), &p).await.unwrap();
        let addr = format!("{ip}:28085");
        wait_for("container HTTP", T, || http_get(&addr, "/healthz")).await;
        let pid = agent.container_pid(&ns.name, &name, "main").unwrap();
        assert!(proc_alive(pid));
        if graceful {
            agent.shutdown().await;
        } else {
            drop(agent);
        }
        assert!(
            !proc_alive(pid),
            "process {pid} survived the agent (graceful={graceful})"
        );
        // Nothing may come back either. A graceful shutdown has awaited every task, so the
        // check holds at once; a dropped agent has only cancelled and aborted them, so the
        // check is repeated for longer than the restart backoff (300 ms): a supervisor that
        // missed the cancellation would restart the container within that window.
        let needle = format!("--listen={ip}:28085");
        let watch_until = tokio::time::Instant::now()
            + if graceful {
                Duration::ZERO
            } else {
                Duration::from_millis(800)
            };
        loop {
            assert_eq!(
                procs_with_arg(&needle),
                Vec::<u32>::new(),
                "graceful={graceful}"
            );
            if tokio::time::Instant::now() >= watch_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(http_get(&addr, "/healthz").await.is_none());
        Api::<Node>::all(client.clone())
            .delete(&node, &DeleteParams::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn pod_waits_for_a_missing_secret_then_runs_with_its_volumes() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-wait").await;
    let node = unique("agent-wait");
    let ip = Ipv4Addr::new(127, 0, 26, 1);
    let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "app"}, "data": {"app.conf": "a=1\n"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let p = pod(
        "waiter",
        &node,
        json!({"spec": {
            "containers": [{
                "name": "main", "image": IMAGE,
                // A wildcard listen address is bound to the node IP.
                "args": ["--listen=:28086", "--conf=/etc/app/app.conf", "--key=/etc/late/k"],
                "volumeMounts": [
                    {"name": "app", "mountPath": "/etc/app"},
                    {"name": "late", "mountPath": "/etc/late"},
                ],
            }],
            "volumes": [
                {"name": "app", "configMap": {"name": "app"}},
                {"name": "late", "secret": {"secretName": "late"}},
            ],
        }}),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let s = wait_for("waiting for the secret", T, || async {
        let s = pod_status(&pods, "waiter").await?;
        let w = &s["containerStatuses"][0]["state"]["waiting"];
        w["message"].as_str()?.contains("\"late\"").then_some(s)
    })
    .await;
    assert_eq!(s["phase"], "Pending");
    assert!(agent.pids().is_empty());

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "late"}, "stringData": {"k": "v"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let addr = format!("{ip}:28086");
    let (_, args) = wait_for("container HTTP", T, || http_get(&addr, "/args")).await;
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[0], "--listen=127.0.26.1:28086");
    let conf = args[1].strip_prefix("--conf=").unwrap();
    assert!(conf.ends_with("volumes/app/app.conf"), "{conf}");
    let key = args[2].strip_prefix("--key=").unwrap();
    assert!(key.ends_with("volumes/late/k"), "{key}");
    let read = |p: &str| {
        let (addr, p) = (addr.clone(), p.to_owned());
        async move { http_get(&addr, &format!("/file?path={p}")).await.unwrap().1 }
    };
    assert_eq!(read(conf).await, "a=1\n");
    assert_eq!(read(key).await, "v");

    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

/// The relay Pod shape the operator creates (design.md §4), run with our real `derper`
/// (built by `workspace_bin`, or taken from `KUBEDERP_BIN_DIR`): certificate files from a
/// Secret with items and mode 0440, state in an emptyDir, `$(HOST_IP)` in env, a wildcard
/// `-a :<port>` bound to the node IP, readiness from `/derp/probe`, and a restart after the
/// relay process is killed.
#[tokio::test]
async fn relay_pod_shape_runs_the_real_derper_and_is_restarted_when_killed() {
    // Build (or find) derper first, outside the time budget of the checks below; the agent
    // maps the image `…/derper` to the same binary.
    let derper = tokio::task::spawn_blocking(|| derp_tests::bins::workspace_bin("derper"))
        .await
        .unwrap();
    assert!(derper.is_file());
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-derper").await;
    let node = unique("agent-derper");
    let ip = Ipv4Addr::new(127, 0, 30, 1);
    let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;
    let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()]).unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "relay-tls"}, "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let stem = ip.to_string();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let p = pod(
        "relay",
        &node,
        json!({"spec": {
            "dnsPolicy": "ClusterFirstWithHostNet",
            "enableServiceLinks": false,
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "derper", "image": "ghcr.io/kubederp/derper:0.1.0",
                "args": [
                    format!("--hostname={ip}"), "--certmode=manual", "--certdir=/certs",
                    "-a", ":28443", "--http-port=28080", "-c=/var/lib/derper/derper.key",
                    "--stun-port=28478",
                ],
                "env": [
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "DERPER_ADMIN_ADDR", "value": "$(HOST_IP):28090"},
                ],
                "ports": [{"name": "derp", "containerPort": 28443, "hostPort": 28443, "protocol": "TCP"},
                          {"name": "http", "containerPort": 28080, "hostPort": 28080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/derp/probe", "port": 28080, "scheme": "HTTP"},
                    "periodSeconds": 1},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
                "resources": {"requests": {"cpu": "10m"}},
                "volumeMounts": [
                    {"name": "certs", "mountPath": "/certs", "readOnly": true},
                    {"name": "state", "mountPath": "/var/lib/derper"},
                ],
            }],
            "volumes": [
                {"name": "certs", "secret": {"secretName": "relay-tls", "defaultMode": 288, "items": [
                    {"key": "tls.crt", "path": format!("{stem}.crt")},
                    {"key": "tls.key", "path": format!("{stem}.key")}]}},
                {"name": "state", "emptyDir": {}},
            ],
        }}),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let log = agent.log_path(&ns.name, "relay", "derper");
    let ready = wait_until_ready(&pods, "relay").await;
    assert!(
        ready.is_some(),
        "relay not Ready; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        tokio::net::TcpStream::connect((ip, 28443)).await.is_ok(),
        "DERP TLS port on the node IP"
    );
    // The plain-HTTP port may redirect; kubelet counts 200..400 as success, and so do we.
    let (code, _) = http_get(&format!("{ip}:28080"), "/derp/probe")
        .await
        .unwrap();
    assert!((200..400).contains(&code), "HTTP {code}");

    // Killing the relay process: the agent restarts it and it becomes Ready again.
    let pid = agent.container_pid(&ns.name, "relay", "derper").unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL);
    }
    wait_for(
        "relay restarted and Ready",
        Duration::from_secs(20),
        || async {
            let s = pod_status(&pods, "relay").await?;
            (s["containerStatuses"][0]["restartCount"] == 1
                && condition(&s, "Ready").as_deref() == Some("True"))
            .then_some(())
        },
    )
    .await;
    assert_ne!(agent.container_pid(&ns.name, "relay", "derper"), Some(pid));
    pods.delete("relay", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("relay removed", T, || async {
        pods.get_opt("relay").await.ok()?.is_none().then_some(())
    })
    .await;
    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

async fn wait_until_ready(pods: &Api<Pod>, name: &str) -> Option<()> {
    derp_tests::k8s::wait_until(Duration::from_secs(25), || async {
        let s = pod_status(pods, name).await?;
        (condition(&s, "Ready").as_deref() == Some("True")).then_some(())
    })
    .await
}

#[tokio::test]
async fn two_containers_share_an_empty_dir_and_both_gate_readiness() {
    let client = ControlPlane::shared().client().await;
    let ns = TestNamespace::create(&client, "agent-multi").await;
    let node = unique("agent-multi");
    let ip = Ipv4Addr::new(127, 0, 29, 1);
    let (agent, _dir) = start_agent(&client, vec![NodeSpec::new(&node, ip)]).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let container = |name: &str, port: u16, file: &str| {
        json!({
            "name": name, "image": IMAGE,
            "args": [format!("--listen=:{port}"), format!("--ready-file=/shared/{file}")],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": port}, "periodSeconds": 1},
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        })
    };
    let p = pod(
        "pair",
        &node,
        json!({"spec": {
            "containers": [container("relay", 28091, "relay-ready"), container("sidecar", 28092, "sidecar-ready")],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        }}),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let (_, args) = wait_for("relay HTTP", T, || http_get("127.0.29.1:28091", "/args")).await;
    wait_for("sidecar HTTP", T, || {
        http_get("127.0.29.1:28092", "/healthz")
    })
    .await;
    let relay_ready = PathBuf::from(
        args.lines()
            .find_map(|l| l.strip_prefix("--ready-file="))
            .unwrap(),
    );
    let shared = relay_ready.parent().unwrap().to_owned();
    assert!(agent.container_pid(&ns.name, "pair", "relay").is_some());
    assert!(agent.container_pid(&ns.name, "pair", "sidecar").is_some());

    // Only one container ready: the Pod is not.
    std::fs::write(&relay_ready, "").unwrap();
    let s = wait_for("relay container ready", T, || async {
        let s = pod_status(&pods, "pair").await?;
        let cs = s["containerStatuses"].as_array()?;
        cs.iter()
            .any(|c| c["name"] == "relay" && c["ready"] == true)
            .then_some(s)
    })
    .await;
    assert_eq!(condition(&s, "ContainersReady").as_deref(), Some("False"));
    assert_eq!(condition(&s, "Ready").as_deref(), Some("False"));
    // The sidecar sees the same directory.
    std::fs::write(shared.join("sidecar-ready"), "").unwrap();
    wait_for("pod Ready with both containers", T, || async {
        let s = pod_status(&pods, "pair").await?;
        (condition(&s, "ContainersReady").as_deref() == Some("True")
            && condition(&s, "Ready").as_deref() == Some("True"))
        .then_some(())
    })
    .await;
    agent.shutdown().await;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}
