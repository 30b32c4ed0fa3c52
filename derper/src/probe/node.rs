//! Probing nodes: resolving and dialling a node (TCP, then [`super::tls`], then the DERP
//! handshake), a packet round trip between two probe clients on a node, STUN, the second
//! address family, and the cross-node (mesh) deliveries of a region.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::options::ProbeOptions;
use super::report::{
    Check, FamilyChecks, MeshCheck, NodeChecks, NodeReport, REPORT_VERSION, RegionReport, Report,
    Status, TlsInfo,
};
use super::stun::stun_probe;
use super::tls::tls_connect;
use crate::client::{Client, ClientConfig, TlsMode, UpgradeMode};
use crate::derpmap::{DerpMap, DerpNode, DerpRegion, NoStunPort};
use crate::duration::fmt_duration;
use crate::key::{NodePrivateKey, NodePublicKey};
use crate::proto::codec::ServerFrame;

/// Picks the address to dial for `port`: the IPv4 literal, else the IPv6 literal, else DNS
/// of HostName restricted to the families whose field is empty (spec §9.3).
async fn resolve(node: &DerpNode, ip_override: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = ip_override.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(ip) = node.ipv4.parse::<std::net::Ipv4Addr>() {
        return Ok(SocketAddr::new(ip.into(), port));
    }
    if let Ok(ip) = node.ipv6.parse::<std::net::Ipv6Addr>() {
        return Ok(SocketAddr::new(ip.into(), port));
    }
    if let Ok(ip) = node.host_name.parse::<IpAddr>() {
        let allowed = match ip {
            IpAddr::V4(_) => node.ipv4.is_empty(),
            IpAddr::V6(_) => node.ipv6.is_empty(),
        };
        if allowed {
            return Ok(SocketAddr::new(ip, port));
        }
    }
    let (v4, v6) = (node.ipv4.is_empty(), node.ipv6.is_empty());
    if !v4 && !v6 {
        return Err(format!(
            "no usable address: IPv4 {:?} and IPv6 {:?} are neither addresses nor empty",
            node.ipv4, node.ipv6
        ));
    }
    let addrs = tokio::net::lookup_host((node.host_name.as_str(), port))
        .await
        .map_err(|e| format!("resolving {}: {e}", node.host_name))?;
    addrs
        .into_iter()
        .find(|a| (a.is_ipv4() && v4) || (a.is_ipv6() && v6))
        .ok_or_else(|| format!("{} has no address of an allowed family", node.host_name))
}

/// One full probe connection and the check results of its steps.
struct Dialed {
    tcp: Check,
    tls: Check,
    derp: Check,
    address: Option<SocketAddr>,
    tls_info: Option<TlsInfo>,
    notes: Vec<String>,
    client: Option<Client>,
}

async fn dial(node: &DerpNode, opts: &ProbeOptions, with_notes: bool) -> Dialed {
    dial_at(node, None, opts, with_notes).await
}

/// [`dial`] to `at` instead of the address [`resolve`] picks.
async fn dial_at(
    node: &DerpNode,
    at: Option<SocketAddr>,
    opts: &ProbeOptions,
    with_notes: bool,
) -> Dialed {
    let mut d = Dialed {
        tcp: Check::skip("not reached"),
        tls: Check::skip("not reached"),
        derp: Check::skip("not reached"),
        address: None,
        tls_info: None,
        notes: Vec::new(),
        client: None,
    };
    let port = node.derp_port_to_dial();
    let resolved = match at {
        Some(a) => Ok(a),
        None => resolve(node, "", port).await,
    };
    let addr = match resolved {
        Ok(a) => a,
        Err(e) => {
            d.tcp = Check::fail(e);
            return d;
        }
    };
    d.address = Some(addr);
    let start = Instant::now();
    let tcp = match tokio::time::timeout(opts.timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            d.tcp = Check::fail(format!(
                "connecting to {addr} timed out after {}",
                fmt_duration(opts.timeout)
            ));
            return d;
        }
        Ok(Err(e)) => {
            d.tcp = Check::fail(format!("connecting to {addr}: {e}"));
            return d;
        }
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    d.tcp = Check::pass(format!("connected to {addr}"), Some(start.elapsed()));
    let t = tls_connect(node, tcp, opts, with_notes).await;
    d.tls = t.check;
    d.tls_info = t.info;
    d.notes = t.notes;
    let Some(stream) = t.stream else {
        return d;
    };
    let tls13 = stream.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    // Like Go (spec §2.3, §11 P4): fast start only with TLS 1.3 and a usable metacert.
    let upgrade = match (tls13, t.metacert_key) {
        (true, Some(k)) if !k.is_zero() => UpgradeMode::FastStart(k),
        _ => UpgradeMode::Plain,
    };
    let mut cfg = ClientConfig::new(addr);
    cfg.host = node.host_name.clone();
    cfg.tls = TlsMode::Plain;
    cfg.upgrade = upgrade;
    cfg.is_prober = true;
    cfg.connect_timeout = opts.timeout;
    let key = NodePrivateKey::generate();
    let start = Instant::now();
    match tokio::time::timeout(opts.timeout, Client::connect_stream(stream, &cfg, &key)).await {
        Err(_) => {
            d.derp = Check::fail(format!(
                "DERP handshake timed out after {} (no 101 / ServerKey / ServerInfo)",
                fmt_duration(opts.timeout)
            ));
        }
        Ok(Err(e)) => d.derp = Check::fail(format!("DERP handshake failed: {e}")),
        Ok(Ok(c)) => {
            let fast = c.used_fast_start();
            if let (Some(info), Some(mk)) = (d.tls_info.as_mut(), t.metacert_key) {
                if let Some(m) = info.metacert.as_mut() {
                    m.matches_server_key = Some(mk == c.server_key());
                }
                if mk != c.server_key() && with_notes {
                    d.notes
                        .push("the metacert names a different key than the ServerKey frame".into());
                }
            }
            d.derp = Check::pass(
                format!(
                    "server key {}, {}",
                    c.server_key().to_nodekey_string(),
                    if fast {
                        "fast start"
                    } else {
                        "101 Switching Protocols"
                    }
                ),
                Some(start.elapsed()),
            );
            d.client = Some(c);
        }
    }
    d
}

/// Waits on `to` for a RecvPacket carrying exactly `payload` (answering server pings).
async fn wait_for_packet(to: &mut Client, payload: &[u8]) -> Result<NodePublicKey, String> {
    loop {
        match to.recv().await {
            Ok(ServerFrame::RecvPacket { src, packet }) if packet.as_ref() == payload => {
                return Ok(src);
            }
            Ok(ServerFrame::Ping(d)) => {
                let _ = to.writer().send_pong(d).await;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("receiving: {e}")),
        }
    }
}

/// Interval between re-sends while waiting for delivery (the receiver may be registered
/// with a short delay, or a mesh peer may still be learning about it).
const RESEND_EVERY: Duration = Duration::from_millis(250);

/// Sends a fresh payload from `from` to `to`'s key until it arrives or `limit` passes;
/// returns the delivery time measured from the send that arrived.
async fn deliver(from: &mut Client, to: &mut Client, limit: Duration) -> Result<Duration, String> {
    let mut payload = b"derpprobe ".to_vec();
    payload.extend_from_slice(&rand::random::<[u8; 16]>());
    let dst = to.public_key();
    let deadline = Instant::now() + limit;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("nothing arrived within {}", fmt_duration(limit)));
        }
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, from.send_packet(&dst, &payload)).await {
            Err(_) => return Err("sending timed out".into()),
            Ok(Err(e)) => return Err(format!("sending: {e}")),
            Ok(Ok(())) => {}
        }
        let wait_until = (sent + RESEND_EVERY).min(deadline);
        match tokio::time::timeout_at(wait_until, wait_for_packet(to, &payload)).await {
            Ok(Ok(src)) if src == from.public_key() => return Ok(sent.elapsed()),
            Ok(Ok(src)) => {
                return Err(format!(
                    "the packet arrived from {} instead of the sender",
                    src.short()
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
    }
}

/// Probe clients kept open after a node's checks, for the cross-node checks.
struct NodeClients {
    sender: Client,
    receiver: Client,
}

async fn probe_node_inner(
    node: &DerpNode,
    opts: &ProbeOptions,
) -> (NodeReport, Option<NodeClients>) {
    let stun_fut = probe_stun(node, None, opts);
    let derp_fut = async {
        if node.stun_only {
            return None;
        }
        let a = dial(node, opts, true).await;
        Some(a)
    };
    let v6_fut = async {
        match second_family(node) {
            Some(v6) => Some(Box::pin(probe_ipv6(node, v6, opts)).await),
            None => None,
        }
    };
    let ((stun, stun_address, mapped), a, ipv6) = tokio::join!(stun_fut, derp_fut, v6_fut);
    let mut report = NodeReport {
        name: node.name.clone(),
        region_id: node.region_id,
        host_name: node.host_name.clone(),
        address: None,
        stun_address,
        ok: false,
        checks: NodeChecks {
            tcp: Check::skip("STUNOnly node: not dialled for DERP"),
            tls: Check::skip("STUNOnly node"),
            derp: Check::skip("STUNOnly node"),
            round_trip: Check::skip("STUNOnly node"),
            stun,
        },
        server_key: None,
        fast_start: None,
        tls: None,
        stun_mapped_address: mapped,
        ipv6,
        notes: Vec::new(),
    };
    let mut clients = None;
    if let Some(a) = a {
        report.address = a.address.map(|x| x.to_string());
        report.checks.tcp = a.tcp;
        report.checks.tls = a.tls;
        report.checks.derp = a.derp;
        report.tls = a.tls_info;
        report.notes = a.notes;
        report.checks.round_trip = Check::skip("not reached (DERP handshake failed)");
        if let Some(mut ca) = a.client {
            report.server_key = Some(ca.server_key().to_nodekey_string());
            report.fast_start = Some(ca.used_fast_start());
            let b = dial(node, opts, false).await;
            match b.client {
                None => {
                    let why = [b.tcp, b.tls, b.derp]
                        .into_iter()
                        .find(|c| c.status == Status::Fail)
                        .map(|c| c.message)
                        .unwrap_or_default();
                    report.checks.round_trip =
                        Check::fail(format!("a second probe client could not connect: {why}"));
                }
                Some(mut cb) => {
                    if cb.server_key() != ca.server_key() {
                        report.notes.push(format!(
                            "two connections saw different server keys ({} and {}): several \
                             relays behind one address? (spec §2.6)",
                            ca.server_key().short(),
                            cb.server_key().short()
                        ));
                    }
                    let there = deliver(&mut ca, &mut cb, opts.timeout).await;
                    let back = match &there {
                        Ok(_) => deliver(&mut cb, &mut ca, opts.timeout).await,
                        Err(_) => Err(String::new()),
                    };
                    match (there, back) {
                        (Ok(t1), Ok(t2)) => {
                            report.checks.round_trip = Check::pass(
                                "packet relayed between two probe clients in both directions",
                                Some(t1 + t2),
                            );
                            clients = Some(NodeClients {
                                sender: ca,
                                receiver: cb,
                            });
                        }
                        (Err(e), _) => {
                            report.checks.round_trip =
                                Check::fail(format!("client A -> client B: {e}"));
                        }
                        (Ok(_), Err(e)) => {
                            report.checks.round_trip =
                                Check::fail(format!("client B -> client A: {e}"));
                        }
                    }
                }
            }
        }
    }
    report.ok = report.checks.iter().iter().all(|(_, c)| c.ok())
        && report
            .ipv6
            .as_ref()
            .is_none_or(|f| f.iter().iter().all(|(_, c)| c.ok()));
    (report, clients)
}

/// Runs the STUN check; returns (check, probed address, mapped address).
async fn probe_stun(
    node: &DerpNode,
    at: Option<IpAddr>,
    opts: &ProbeOptions,
) -> (Check, Option<String>, Option<String>) {
    let port = match node.stun_port_to_probe() {
        Ok(p) => p,
        Err(NoStunPort::Disabled) => {
            return (Check::skip("STUN disabled (STUNPort -1)"), None, None);
        }
        Err(NoStunPort::Invalid(p)) => {
            return (
                Check::fail(format!("STUNPort {p} is not a port")),
                None,
                None,
            );
        }
    };
    let resolved = match at {
        Some(ip) => Ok(SocketAddr::new(ip, port)),
        None => resolve(node, &node.stun_test_ip, port).await,
    };
    let target = match resolved {
        Ok(t) => t,
        Err(e) => return (Check::fail(e), None, None),
    };
    match stun_probe(target, opts.stun_timeout).await {
        Ok((mapped, rtt)) => (
            Check::pass(format!("mapped address {mapped}"), Some(rtt)),
            Some(target.to_string()),
            Some(mapped.to_string()),
        ),
        Err(e) => (Check::fail(e), Some(target.to_string()), None),
    }
}

/// The node's IPv6 literal when the primary checks used its IPv4 literal (both families
/// published, spec §9.3): clients use either, so both are checked.
fn second_family(node: &DerpNode) -> Option<std::net::Ipv6Addr> {
    node.ipv4.parse::<std::net::Ipv4Addr>().ok()?;
    node.ipv6.parse().ok()
}

/// TCP, TLS, DERP handshake and STUN over the node's IPv6 address.
async fn probe_ipv6(node: &DerpNode, v6: std::net::Ipv6Addr, opts: &ProbeOptions) -> FamilyChecks {
    let addr = SocketAddr::new(v6.into(), node.derp_port_to_dial());
    let derp_fut = async {
        if node.stun_only {
            return None;
        }
        Some(dial_at(node, Some(addr), opts, false).await)
    };
    let stun_fut = async {
        if node.stun_test_ip.is_empty() {
            probe_stun(node, Some(v6.into()), opts).await.0
        } else {
            Check::skip("STUNTestIP overrides the STUN target")
        }
    };
    let (d, stun) = tokio::join!(derp_fut, stun_fut);
    let (tcp, tls, derp) = match d {
        Some(d) => (d.tcp, d.tls, d.derp),
        None => (
            Check::skip("STUNOnly node"),
            Check::skip("STUNOnly node"),
            Check::skip("STUNOnly node"),
        ),
    };
    FamilyChecks {
        address: addr.to_string(),
        tcp,
        tls,
        derp,
        stun,
    }
}

/// Probes one node (all checks except the cross-node ones) and closes its clients.
pub async fn probe_node(node: &DerpNode, opts: &ProbeOptions) -> NodeReport {
    Box::pin(probe_node_inner(node, opts)).await.0
}

/// Probes every node of a region concurrently, then (with `opts.mesh` and more than one
/// DERP node) every ordered pair of nodes: a packet from a probe client on `from` to a probe
/// client on `to`, which only arrives when the two relays are meshed (spec §6.10).
pub async fn probe_region(region: &DerpRegion, opts: &ProbeOptions) -> RegionReport {
    let results =
        futures::future::join_all(region.nodes.iter().map(|n| probe_node_inner(n, opts))).await;
    let mut nodes = Vec::new();
    let mut clients: Vec<(String, bool, Option<NodeClients>)> = Vec::new();
    for (node, (report, c)) in region.nodes.iter().zip(results) {
        clients.push((node.name.clone(), node.stun_only, c));
        nodes.push(report);
    }
    let mut problems = Vec::new();
    if region.nodes.is_empty() {
        problems.push("the region has no nodes".to_owned());
    }
    let mut mesh = Vec::new();
    let derp_nodes: Vec<usize> = (0..clients.len()).filter(|&i| !clients[i].1).collect();
    if opts.mesh && derp_nodes.len() > 1 {
        for &i in &derp_nodes {
            for &j in &derp_nodes {
                if i == j {
                    continue;
                }
                let (from, to) = (clients[i].0.clone(), clients[j].0.clone());
                let check = mesh_check(&mut clients, i, j, opts.mesh_timeout).await;
                mesh.push(MeshCheck { from, to, check });
            }
        }
    }
    let ok = problems.is_empty() && nodes.iter().all(|n| n.ok) && mesh.iter().all(|m| m.check.ok());
    RegionReport {
        region_id: region.region_id,
        region_code: region.region_code.clone(),
        ok,
        nodes,
        mesh,
        problems,
    }
}

async fn mesh_check(
    clients: &mut [(String, bool, Option<NodeClients>)],
    i: usize,
    j: usize,
    limit: Duration,
) -> Check {
    let (from_name, to_name) = (clients[i].0.clone(), clients[j].0.clone());
    // Borrow two distinct elements mutably.
    let (a, b) = if i < j {
        let (l, r) = clients.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = clients.split_at_mut(i);
        (&mut r[0], &mut l[j])
    };
    let (Some(ca), Some(cb)) = (a.2.as_mut(), b.2.as_mut()) else {
        let down: Vec<&str> = [(&a.0, &a.2), (&b.0, &b.2)]
            .into_iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        return Check::fail(format!(
            "cannot check {from_name} -> {to_name}: no working probe clients on {} (see its \
             node checks)",
            down.join(" and ")
        ));
    };
    match deliver(&mut ca.sender, &mut cb.receiver, limit).await {
        Ok(t) => Check::pass(
            format!("packet from a client on {from_name} reached a client on {to_name}"),
            Some(t),
        ),
        Err(e) => Check::fail(format!(
            "a packet from a client on {from_name} to a client on {to_name} was not delivered \
             ({e}): the relays are not meshed, or the mesh link {from_name} -> {to_name} is \
             down (check the mesh key and the mesh-with/peers list)"
        )),
    }
}

/// Probes every region of `map` (regions one after another, nodes of a region
/// concurrently).
pub async fn probe_map(map: &DerpMap, opts: &ProbeOptions) -> Report {
    let mut regions = Vec::new();
    for r in map.regions.values() {
        regions.push(probe_region(r, opts).await);
    }
    Report {
        version: REPORT_VERSION,
        ok: regions.iter().all(|r| r.ok),
        regions,
    }
}
