//! Real Tailscale clients across a mesh of our relays (issue 5, spec §6.10, §12 items
//! 32–36): three `derper` processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with pinned
//! self-signed IP certificates, meshed through one `--mesh-peers-file` that lists all three
//! (each node detects itself and skips it); `derpinterop` v1.82.5 and v1.104.7 put client A
//! on one node and client B on another.
//!
//! Also records what happens when upstream Go `derper --mesh-with` points at our relay's
//! IP with its self-signed certificate (it cannot verify it; see derper/README.md).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use derp_tests::interop::{
    CLIENT_VERSIONS, REGION_ID, TS_NEW, derp_map, find_printed_node, our_derper, run_against,
    upstream_derper, write_derp_map,
};
use serde_json::{Value, json};

const MESH_KEY: &str = "6d657368696e7465726f705a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

#[allow(clippy::disallowed_methods)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// A relay process bound to one loopback address; killed by its own pid on drop.
struct Node {
    name: String,
    ip: IpAddr,
    port: u16,
    stun_port: u16,
    pin: String,
    log_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    fn derp_node(&self) -> Value {
        json!({
            "Name": self.name,
            "RegionID": REGION_ID,
            "HostName": self.ip.to_string(),
            "CertName": self.pin,
            "IPv4": self.ip.to_string(),
            "IPv6": "none",
            "STUNPort": self.stun_port,
            "DERPPort": self.port,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports(ip: IpAddr) -> (u16, u16) {
    let t = TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let u = UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (t, u)
}

/// Starts `bin` upstream-style on `ip` (manual certmode, self-signed IP certificate) with
/// `extra` flags and waits for its DERPNode line and open port.
fn start(bin: &Path, name: &str, ip: IpAddr, extra: &[&str], ours: bool) -> Node {
    let dir = tempfile::Builder::new()
        .prefix("kubederp-mesh-")
        .tempdir()
        .unwrap();
    let (port, stun_port) = free_ports(ip);
    let log_path = dir.path().join("relay.log");
    let log = fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["--hostname", &ip.to_string(), "--certmode", "manual"])
        .arg("--certdir")
        .arg(dir.path().join("certs"))
        .args(["-a", &SocketAddr::new(ip, port).to_string()])
        .args(["--http-port", "-1", "--stun-port", &stun_port.to_string()])
        .arg("-c")
        .arg(dir.path().join("derper.key"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if ours {
        cmd.args(["--admin-addr", ""]).env("RUST_LOG", "info");
    }
    let child = cmd.spawn().unwrap();
    let mut node = Node {
        name: name.to_owned(),
        ip,
        port,
        stun_port,
        pin: String::new(),
        log_path,
        child,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = node.child.try_wait() {
            panic!("{name} exited ({st}):\n{}", node.log());
        }
        if node.pin.is_empty()
            && let Some(n) = find_printed_node(&node.log())
        {
            node.pin = n["CertName"].as_str().unwrap().to_owned();
        }
        if !node.pin.is_empty()
            && TcpStream::connect_timeout(&node.addr(), Duration::from_millis(200)).is_ok()
        {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready:\n{}",
            node.log()
        );
        pause(Duration::from_millis(50));
    }
}

fn wait_log(node: &Node, what: &str, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while node.log().matches(what).count() < count {
        assert!(
            Instant::now() < deadline,
            "{}: wanted {count}× {what:?}; log:\n{}",
            node.name,
            node.log()
        );
        pause(Duration::from_millis(50));
    }
}

fn write_peers(path: &Path, nodes: &[&Node]) {
    let text: String = nodes
        .iter()
        .map(|n| format!("{} {}\n", n.addr(), n.pin))
        .collect();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn go_clients_exchange_across_three_meshed_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let psk = tmp.path().join("mesh.key");
    fs::write(&psk, MESH_KEY).unwrap();
    let peers = tmp.path().join("peers");
    fs::write(&peers, "").unwrap();
    let (psk, peers_s) = (psk.to_str().unwrap(), peers.to_str().unwrap());
    let args = [
        "--mesh-psk-file",
        psk,
        "--mesh-peers-file",
        peers_s,
        "--mesh-peers-poll",
        "100ms",
    ];
    let bin = our_derper();
    let nodes: Vec<Node> = (1..=3u8)
        .map(|i| {
            let name = format!("900{}", (b'a' + i - 1) as char);
            start(&bin, &name, IpAddr::from([127, 0, 0, i]), &args, true)
        })
        .collect();
    // Pins exist only once every node generated its certificate; the file is re-read.
    write_peers(&peers, &nodes.iter().collect::<Vec<_>>());
    for n in &nodes {
        wait_log(n, "mesh peer up", 2, Duration::from_secs(15));
        wait_log(n, "detected self-connect", 1, Duration::from_secs(15));
    }
    let map_nodes: Vec<Value> = nodes.iter().map(Node::derp_node).collect();
    let map = write_derp_map(tmp.path(), "derpmap.json", &derp_map(&map_nodes)).unwrap();
    for client in CLIENT_VERSIONS {
        for (a, b) in [(0, 1), (1, 2), (2, 0)] {
            let (na, nb) = (&nodes[a].name, &nodes[b].name);
            let run = run_against(
                client,
                "exchange",
                &map,
                Some("upgrade"),
                &["-node-a", na, "-node-b", nb],
            )
            .unwrap();
            assert!(
                run.ok() && run.success,
                "{client}: A on {na}, B on {nb}: {}\n{}\nlogs:\n{}\n{}",
                run.json,
                run.stderr,
                nodes[a].log(),
                nodes[b].log()
            );
            assert_eq!(run.json["a"]["node"], na.as_str());
            assert_eq!(run.json["b"]["node"], nb.as_str());
        }
    }
}

/// Upstream's mesh client dials `https://<host>/derp` and verifies the certificate like a
/// browser (system roots + baked-in Let's Encrypt roots, name = host); it has no notion of
/// `sha256-raw:` pins. Pointed at our relay's IP with its self-signed certificate, every
/// attempt fails TLS verification, so upstream never meshes with a pinned-IP node.
#[test]
fn upstream_mesh_with_to_pinned_ip_node_fails_certificate_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let psk = tmp.path().join("mesh.key");
    fs::write(&psk, MESH_KEY).unwrap();
    let psk = psk.to_str().unwrap();
    let ours = start(
        &our_derper(),
        "900a",
        IpAddr::from([127, 0, 0, 2]),
        &["--mesh-psk-file", psk],
        true,
    );
    let target = ours.addr().to_string();
    let up = start(
        &upstream_derper(TS_NEW),
        "900b",
        IpAddr::from([127, 0, 0, 3]),
        &["--mesh-psk-file", psk, "--mesh-with", &target],
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = up.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(&target) && l.contains("x509"))
        {
            assert!(
                line.contains("certificate signed by unknown authority"),
                "unexpected upstream error: {line}"
            );
            eprintln!("upstream mesh client: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream logged no TLS error for {target}:\n{log}"
        );
        pause(Duration::from_millis(100));
    }
    // Nothing meshed: our relay never got a watcher.
    assert!(!ours.log().contains("mesh peer up"));
}
