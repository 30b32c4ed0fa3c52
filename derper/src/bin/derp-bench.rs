//! `derp-bench`: a DERP load generator (performance.md §5.2–§5.4). It drives one relay
//! (ours or upstream Go `derper`, whichever listens on `--addr`) with one workload, measures
//! what the relay delivered and the relay's CPU and memory from `/proc/<pid>`, and prints
//! one JSON object on stdout.
//!
//! Every connection is a [`derper::client::Client`] over [`derper::bench::CorkedIo`], so
//! each packet is its own TLS record (as tailscaled sends them) while the generator pays
//! one `write(2)` per batch. Everything runs on one thread (pin it with `taskset`).
//!
//! Not an orchestrator: starting servers, alternating them and the statistics over runs
//! live in `bench/run.py` (driven by `scripts/bench`). Every loop is bounded in time.

#![allow(clippy::print_stdout)]
// Rates, percentile indices and sample counts are small non-negative floats here.
#![allow(clippy::cast_possible_truncation)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use derper::bench::{Cork, Target, connect};
use derper::client::{ClientReader, ClientWriter};
use derper::key::{NodePrivateKey, NodePublicKey};
use derper::proto::codec::ServerFrame;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Payload header written by senders: sequence number, send time (ns since [`epoch`]).
const HDR: usize = 16;
/// Smallest payload the generator can send (the header must fit).
const MIN_SIZE: usize = HDR;
/// Upper bound on latency samples kept per run.
const MAX_SAMPLES: usize = 2_000_000;
/// Linux `USER_HZ` (the unit of utime/stime in `/proc/<pid>/stat`); 100 on every
/// architecture Linux supports for user space.
const CLK_TCK: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "DERP load generator (one workload against one relay, JSON out)"
)]
struct Args {
    /// The relay's TLS listener.
    #[arg(long, default_value = "127.0.0.1:443")]
    addr: SocketAddr,
    /// The relay's STUN listener (stun workload).
    #[arg(long)]
    stun_addr: Option<SocketAddr>,
    /// The relay's process id, for CPU (utime+stime) and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Mesh workload: receivers connect to this second relay, meshed with `--addr`, so every
    /// packet crosses the mesh (throughput, rate and blast).
    #[arg(long)]
    peer_addr: Option<SocketAddr>,
    /// The second relay's process id: its CPU is added to the server CPU.
    #[arg(long)]
    peer_pid: Option<u32>,
    /// Second octet of the loopback source addresses (127.N.x.1) used by this run.
    #[arg(long, default_value_t = 1)]
    src_net: u8,
    /// Warm-up seconds before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured window in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Clone, Subcommand)]
enum Workload {
    /// Capacity without loss: each pair keeps at most `window` packets in flight
    /// (window < the relay's 32-deep queue, so a relay that keeps up drops nothing).
    Throughput {
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        #[arg(long, default_value_t = 1400)]
        size: usize,
        #[arg(long, default_value_t = 24)]
        window: u64,
    },
    /// Open loop at a fixed total rate (pkt/s) split over the pairs: delivered rate, loss,
    /// one-way latency percentiles, relay CPU per GB.
    Rate {
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        #[arg(long, default_value_t = 1400)]
        size: usize,
        #[arg(long)]
        rate: f64,
    },
    /// Fairness: every sender sends as fast as TCP lets it; Jain's index over flows.
    Blast {
        #[arg(long, default_value_t = 8)]
        flows: usize,
        #[arg(long, default_value_t = 1400)]
        size: usize,
    },
    /// Idle memory: RSS delta per connection for `conns` idle TLS+DERP connections, and
    /// active-pair throughput before and with the idle fleet present.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to wait after the last connection before reading RSS.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Active pairs measured before/with the fleet (0 = skip).
        #[arg(long, default_value_t = 4)]
        pairs: usize,
    },
    /// Handshake rate: `concurrency` dialers connect (TCP+TLS+upgrade+DERP) and close.
    Churn {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Write a throwaway CA (`ca.pem`) and a `127.0.0.1` certificate it issued
    /// (`127.0.0.1.crt`, `127.0.0.1.key`) into `dir`, for relays meshed on loopback (their
    /// `--mesh-with` clients trust the CA through `SSL_CERT_FILE`). Prints the leaf's pin.
    MeshCerts {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// STUN: `sockets` UDP clients keep `window` binding requests outstanding each.
    Stun {
        #[arg(long, default_value_t = 4)]
        sockets: usize,
        #[arg(long, default_value_t = 16)]
        window: usize,
    },
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// CPU seconds (user+system, all threads) of a process from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(3) … utime(14) stime(15), i.e. indices 11 and 12.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / CLK_TCK)
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// (steal, total) jiffies over all CPUs from `/proc/stat`.
fn steal_total() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.get(7).copied().unwrap_or(0), v.iter().take(8).sum())
}

/// A point-in-time reading of everything measured around a window.
#[derive(Debug, Clone, Copy)]
struct Probe {
    at: Instant,
    server_cpu: f64,
    client_cpu: f64,
    steal: (u64, u64),
}

#[derive(Debug)]
struct Meter {
    pid: Option<String>,
    /// A second relay (mesh workload), whose CPU counts as server CPU too.
    peer_pid: Option<String>,
}

impl Meter {
    fn probe(&self) -> Probe {
        let cpu = |p: &Option<String>| p.as_deref().and_then(cpu_seconds).unwrap_or(0.0);
        Probe {
            at: Instant::now(),
            server_cpu: cpu(&self.pid) + cpu(&self.peer_pid),
            client_cpu: cpu_seconds("self").unwrap_or(0.0),
            steal: steal_total(),
        }
    }

    fn rss(&self) -> u64 {
        self.pid.as_deref().and_then(rss_kib).unwrap_or(0)
    }

    /// Common fields for a window between two probes.
    fn window(&self, a: Probe, b: Probe) -> Value {
        let wall = b.at.duration_since(a.at).as_secs_f64();
        let dst = b.steal.0.saturating_sub(a.steal.0) as f64;
        let dtot = b.steal.1.saturating_sub(a.steal.1).max(1) as f64;
        let client_util = (b.client_cpu - a.client_cpu) / wall;
        json!({
            "wall_s": wall,
            "server_cpu_s": b.server_cpu - a.server_cpu,
            "server_util": (b.server_cpu - a.server_cpu) / wall,
            "client_util": client_util,
            // performance.md §5.1: a run whose generator used > 85 % of its core is a
            // lower bound for the relay, not a capacity.
            "client_bound": client_util > 0.85,
            "steal_pct": 100.0 * dst / dtot,
            "server_rss_kib": self.rss(),
        })
    }
}

fn merge(a: &mut Value, b: Value) {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
}

#[allow(unsafe_code)]
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}

/// Loopback source address number `i` of this run: 127.N.(i % 200 + 1).1.
fn src_ip(net: u8, i: usize) -> IpAddr {
    let x = u8::try_from(i % 200 + 1).unwrap_or(1);
    IpAddr::V4(Ipv4Addr::new(127, net, x, 1))
}

fn percentiles(mut v: Vec<u64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let p = |q: f64| {
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    json!({
        "samples": v.len(),
        "p50_us": p(0.50), "p90_us": p(0.90), "p99_us": p(0.99), "p999_us": p(0.999),
        "max_us": v.last().copied().unwrap_or(0) as f64 / 1000.0,
    })
}

/// Shared counters of one sender → receiver flow.
#[derive(Debug, Default)]
struct Flow {
    sent: AtomicU64,
    recv: AtomicU64,
    progress: tokio::sync::Notify,
}

/// 0 = warm-up, 1 = measuring, 2 = stopping.
#[derive(Debug, Default)]
struct Phase(AtomicU8);

impl Phase {
    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, p: u8) {
        self.0.store(p, Ordering::Relaxed);
    }
}

/// The sending half of a flow.
struct Sender {
    tx: ClientWriter,
    cork: Cork,
    dst: NodePublicKey,
}

impl Sender {
    /// Sends `n` packets as `n` TLS records in one `write(2)`; returns the new sequence.
    /// With `stamp`, each packet carries its send time (for one-way latency).
    async fn burst(&mut self, buf: &mut [u8], mut seq: u64, n: u64, stamp: bool) -> Option<u64> {
        self.cork.cork();
        for _ in 0..n {
            fill_payload(buf, seq, stamp);
            self.tx.send_packet(&self.dst, buf).await.ok()?;
            seq += 1;
        }
        self.cork.uncork();
        self.tx.flush().await.ok()?;
        Some(seq)
    }
}

/// Connects `n` sender/receiver pairs: senders to `target`, receivers to `rx_target`
/// (the same relay, or a second one meshed with it).
async fn make_pairs(
    target: &Target,
    rx_target: &Target,
    net: u8,
    n: usize,
    base: usize,
) -> anyhow::Result<Vec<(Sender, ClientReader)>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let ka = NodePrivateKey::generate();
        let kb = NodePrivateKey::generate();
        let (a, cork) = connect(target, Some(src_ip(net, base + 2 * i)), &ka)
            .await
            .context("connecting a sender")?;
        let (b, _) = connect(rx_target, Some(src_ip(net, base + 2 * i + 1)), &kb)
            .await
            .context("connecting a receiver")?;
        clients.push((a, cork, b));
    }
    if rx_target.addr == target.addr {
        // Let the relay finish registering the receivers before the first packet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        // Across a mesh the sender's relay learns of a receiver only through its mesh
        // watch: wait until a probe gets through on every pair.
        for (a, _, b) in &mut clients {
            let dst = b.public_key();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                a.send_packet(&dst, &[0u8; MIN_SIZE]).await?;
                if b.recv_packet(Duration::from_millis(100)).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "no route through the mesh from {} to {}",
                        target.addr,
                        rx_target.addr
                    );
                }
            }
        }
    }
    Ok(clients
        .into_iter()
        .map(|(a, cork, b)| {
            let dst = b.public_key();
            let (_, tx) = a.split();
            let (rx, _) = b.split();
            (Sender { tx, cork, dst }, rx)
        })
        .collect())
}

fn fill_payload(buf: &mut [u8], seq: u64, stamp: bool) {
    if let Some(h) = buf.get_mut(..8) {
        h.copy_from_slice(&seq.to_le_bytes());
    }
    // Reading the clock per packet costs the generator ≈ 4 % of its core; only latency
    // runs need it.
    if stamp && let Some(h) = buf.get_mut(8..HDR) {
        h.copy_from_slice(&now_ns().to_le_bytes());
    }
}

/// Receives RecvPackets until the task is aborted, counting them; while measuring (and if
/// `sample`) appends one-way latencies (ns) to `lat`. No timer per frame: a per-recv timeout
/// would cost the generator a timer-wheel insert and removal per packet.
async fn receive(
    mut rx: ClientReader,
    flow: Arc<Flow>,
    phase: Arc<Phase>,
    lat: Option<Arc<Mutex<Vec<u64>>>>,
) {
    while let Ok(f) = rx.recv().await {
        if let ServerFrame::RecvPacket { packet, .. } = f {
            flow.recv.fetch_add(1, Ordering::Relaxed);
            flow.progress.notify_one();
            if let Some(lat) = &lat
                && phase.get() == 1
            {
                let ts = packet
                    .get(8..HDR)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_le_bytes);
                let d = now_ns().saturating_sub(ts);
                if let Ok(mut l) = lat.lock()
                    && l.len() < MAX_SAMPLES
                {
                    l.push(d);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// At most this many packets in flight per flow (closed loop).
    Window(u64),
    /// Open loop at this many pkt/s per flow.
    Rate(f64),
    /// As fast as TCP accepts.
    Blast,
}

async fn send(mut s: Sender, size: usize, mode: Mode, flow: Arc<Flow>, phase: Arc<Phase>) {
    let mut buf = vec![0u8; size];
    let mut seq = 0u64;
    let mut written_off = 0u64;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while phase.get() < 2 {
        let n = match mode {
            Mode::Window(w) => {
                let inflight = seq - flow.recv.load(Ordering::Relaxed).min(seq) - written_off;
                if inflight >= w {
                    // No progress for 200 ms: write the window off as lost and refill.
                    if tokio::time::timeout(Duration::from_millis(200), flow.progress.notified())
                        .await
                        .is_err()
                    {
                        written_off += inflight;
                    }
                    continue;
                }
                w - inflight
            }
            Mode::Rate(r) => {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * r) as u64;
                // At most 10 ms worth at once: a generator that fell behind shows up as
                // offered < target instead of bursting.
                due.saturating_sub(seq).min((r / 100.0).max(1.0) as u64)
            }
            Mode::Blast => 32,
        };
        if n == 0 {
            continue;
        }
        match s
            .burst(&mut buf, seq, n, matches!(mode, Mode::Rate(_)))
            .await
        {
            Some(next) => seq = next,
            None => return,
        }
        flow.sent.store(seq, Ordering::Relaxed);
    }
}

/// What [`run_flows`] measured: per-flow deltas over the window, whole-run totals, latency
/// samples (rate mode) and the probes around the window.
struct FlowResult {
    win_sent: Vec<u64>,
    win_recv: Vec<u64>,
    tot_sent: u64,
    tot_recv: u64,
    lat: Vec<u64>,
    a: Probe,
    b: Probe,
}

impl FlowResult {
    fn summary(&self, meter: &Meter, size: usize) -> Value {
        let wall = self.b.at.duration_since(self.a.at).as_secs_f64();
        let recv: u64 = self.win_recv.iter().sum();
        let sent: u64 = self.win_sent.iter().sum();
        let pps = recv as f64 / wall;
        let gb = (recv * size as u64) as f64 / 1e9;
        let mut v = meter.window(self.a, self.b);
        let cpu = self.b.server_cpu - self.a.server_cpu;
        merge(
            &mut v,
            json!({
                "delivered_pps": pps,
                "offered_pps": sent as f64 / wall,
                "gbit_s": pps * size as f64 * 8.0 / 1e9,
                "loss_pct_window": if sent > 0 { 100.0 * (1.0 - (recv as f64 / sent as f64).min(1.0)) } else { 0.0 },
                "loss_pct_total": if self.tot_sent > 0 { 100.0 * (1.0 - self.tot_recv as f64 / self.tot_sent as f64).max(0.0) } else { 0.0 },
                "server_cpu_s_per_gb": if gb > 0.0 { cpu / gb } else { f64::NAN },
                "server_cpu_us_per_pkt": if recv > 0 { 1e6 * cpu / recv as f64 } else { f64::NAN },
                "per_flow_pps": self.win_recv.iter().map(|r| *r as f64 / wall).collect::<Vec<_>>(),
                "jain": jain(&self.win_recv),
                "latency": percentiles(self.lat.clone()),
            }),
        );
        v
    }
}

fn jain(x: &[u64]) -> f64 {
    let s: f64 = x.iter().map(|v| *v as f64).sum();
    let s2: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
    if s2 == 0.0 {
        return 0.0;
    }
    s * s / (x.len() as f64 * s2)
}

async fn run_flows(
    meter: &Meter,
    pairs: Vec<(Sender, ClientReader)>,
    size: usize,
    mode: Mode,
    warmup: f64,
    duration: f64,
) -> FlowResult {
    let phase = Arc::new(Phase::default());
    let flows: Vec<Arc<Flow>> = pairs.iter().map(|_| Arc::new(Flow::default())).collect();
    let mut senders = JoinSet::new();
    let mut receivers = JoinSet::new();
    let lat = matches!(mode, Mode::Rate(_)).then(|| Arc::new(Mutex::new(Vec::new())));
    for ((s, rx), f) in pairs.into_iter().zip(&flows) {
        receivers.spawn(receive(rx, f.clone(), phase.clone(), lat.clone()));
        senders.spawn(send(s, size, mode, f.clone(), phase.clone()));
    }
    let snap = |fl: &[Arc<Flow>]| -> (Vec<u64>, Vec<u64>) {
        (
            fl.iter().map(|f| f.sent.load(Ordering::Relaxed)).collect(),
            fl.iter().map(|f| f.recv.load(Ordering::Relaxed)).collect(),
        )
    };
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    phase.set(1);
    let (s0, r0) = snap(&flows);
    let a = meter.probe();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    let b = meter.probe();
    let (s1, r1) = snap(&flows);
    // Stop sending, give in-flight packets 300 ms to arrive, then stop receiving.
    senders.abort_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    phase.set(2);
    let (st, rt) = snap(&flows);
    receivers.abort_all();
    let lat = lat
        .and_then(|l| l.lock().ok().map(|mut v| std::mem::take(&mut *v)))
        .unwrap_or_default();
    FlowResult {
        win_sent: s1.iter().zip(&s0).map(|(x, y)| x - y).collect(),
        win_recv: r1.iter().zip(&r0).map(|(x, y)| x - y).collect(),
        tot_sent: st.iter().sum(),
        tot_recv: rt.iter().sum(),
        lat,
        a,
        b,
    }
}

/// Connects `n` idle clients, `concurrency` at a time; returns them and the wall time.
async fn connect_fleet(
    target: &Target,
    net: u8,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<derper::client::Client>, f64)> {
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let mut next = 0usize;
    let deadline = t0 + Duration::from_secs(120);
    while out.len() < n {
        while next < n && set.len() < concurrency {
            let t = target.clone();
            let src = src_ip(net, 1000 + next);
            set.spawn(async move { connect(&t, Some(src), &NodePrivateKey::generate()).await });
            next += 1;
        }
        let Some(r) = tokio::time::timeout_at(deadline.into(), set.join_next())
            .await
            .context("fleet did not connect within 120 s")?
        else {
            break;
        };
        let (c, _) = r.context("join")?.context("connecting an idle client")?;
        out.push(c);
    }
    Ok((out, t0.elapsed().as_secs_f64()))
}

async fn churn(target: &Target, meter: &Meter, args: &Args, concurrency: usize) -> Value {
    let phase = Arc::new(Phase::default());
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    // A pool of keys, so key generation is not measured and no key is live twice at once.
    let keys: Arc<Vec<NodePrivateKey>> =
        Arc::new((0..4096).map(|_| NodePrivateKey::generate()).collect());
    let mut set = JoinSet::new();
    for d in 0..concurrency {
        let (t, phase, done, failed, lat, keys) = (
            target.clone(),
            phase.clone(),
            done.clone(),
            failed.clone(),
            lat.clone(),
            keys.clone(),
        );
        let net = args.src_net;
        set.spawn(async move {
            let mut i = d;
            let mut local = Vec::new();
            while phase.get() < 2 {
                let t0 = Instant::now();
                let key = &keys[i % keys.len()];
                let r = connect(&t, Some(src_ip(net, i)), key).await;
                let measuring = phase.get() == 1;
                match r {
                    Ok(c) => {
                        if measuring {
                            done.fetch_add(1, Ordering::Relaxed);
                            local.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                        }
                        drop(c);
                    }
                    Err(_) => {
                        if measuring {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                i += concurrency;
            }
            if let Ok(mut l) = lat.lock() {
                l.extend(local);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let d0 = done.load(Ordering::Relaxed);
    phase.set(1);
    let a = meter.probe();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let b = meter.probe();
    phase.set(2);
    let d1 = done.load(Ordering::Relaxed);
    let f1 = failed.load(Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let conns = d1 - d0;
    let mut v = meter.window(a, b);
    let samples = lat.lock().map(|l| l.clone()).unwrap_or_default();
    merge(
        &mut v,
        json!({
            "handshakes_per_s": conns as f64 / wall,
            "failed": f1,
            "server_cpu_us_per_conn": if conns > 0 { 1e6 * (b.server_cpu - a.server_cpu) / conns as f64 } else { f64::NAN },
            "connect_latency": percentiles(samples),
        }),
    );
    v
}

/// The Tailscale binding request ([`derper::probe::stun_binding_request`]) of socket `i`:
/// its transaction ID is `i`, so every socket's requests are distinct.
fn stun_request(i: usize) -> Vec<u8> {
    let mut tx = [0u8; 12];
    tx[..8].copy_from_slice(&(i as u64).to_le_bytes());
    derper::probe::stun_binding_request(derper::stun::TxId(tx))
}

async fn stun(
    stun_addr: SocketAddr,
    meter: &Meter,
    args: &Args,
    sockets: usize,
    window: usize,
) -> anyhow::Result<Value> {
    let phase = Arc::new(Phase::default());
    let got = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for i in 0..sockets {
        let sock = UdpSocket::bind(SocketAddr::new(src_ip(args.src_net, i), 0)).await?;
        sock.connect(stun_addr).await?;
        let req = stun_request(i);
        let (phase, got, lost) = (phase.clone(), got.clone(), lost.clone());
        set.spawn(async move {
            // Batched both ways (recvmmsg/sendmmsg), so that generating a request costs
            // the client less than answering it costs the relay (T10).
            let mut rx = derper::udp::RecvBatch::new(window, 256);
            let mut txb = derper::udp::SendBatch::new(window, req.len());
            let mut out = 0usize;
            while phase.get() < 2 {
                while out < window
                    && txb.push(None, |slot| {
                        slot.copy_from_slice(&req);
                        req.len()
                    })
                {
                    out += 1;
                }
                while txb.pending() > 0 {
                    match txb.try_send(&sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if sock.writable().await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                // One readiness wait (and one timer) per window, then drain every queued
                // response.
                match tokio::time::timeout(Duration::from_millis(20), sock.readable()).await {
                    Ok(Ok(())) => loop {
                        match rx.try_recv(&sock) {
                            Ok(n) => {
                                out = out.saturating_sub(n);
                                got.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => return,
                        }
                    },
                    Ok(Err(_)) => return,
                    Err(_) => {
                        lost.fetch_add(out as u64, Ordering::Relaxed);
                        out = 0;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let g0 = got.load(Ordering::Relaxed);
    let l0 = lost.load(Ordering::Relaxed);
    phase.set(1);
    let a = meter.probe();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let b = meter.probe();
    let g1 = got.load(Ordering::Relaxed);
    let l1 = lost.load(Ordering::Relaxed);
    phase.set(2);
    set.abort_all();
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let mut v = meter.window(a, b);
    merge(
        &mut v,
        json!({
            "responses_per_s": (g1 - g0) as f64 / wall,
            "timed_out": l1 - l0,
            "server_cpu_us_per_response": if g1 > g0 { 1e6 * (b.server_cpu - a.server_cpu) / (g1 - g0) as f64 } else { f64::NAN },
        }),
    );
    Ok(v)
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let nofile = raise_nofile();
    let meter = Meter {
        pid: args.server_pid.map(|p| p.to_string()),
        peer_pid: args.peer_pid.map(|p| p.to_string()),
    };
    let target = Target {
        addr: args.addr,
        tls: derper::bench::tls_config(),
    };
    let rx_target = Target {
        addr: args.peer_addr.unwrap_or(args.addr),
        tls: target.tls.clone(),
    };
    let mut v = match args.workload.clone() {
        Workload::Throughput {
            pairs,
            size,
            window,
        } => {
            check_size(size)?;
            let p = make_pairs(&target, &rx_target, args.src_net, pairs, 0).await?;
            let r = run_flows(
                &meter,
                p,
                size,
                Mode::Window(window),
                args.warmup,
                args.duration,
            )
            .await;
            r.summary(&meter, size)
        }
        Workload::Rate { pairs, size, rate } => {
            check_size(size)?;
            let p = make_pairs(&target, &rx_target, args.src_net, pairs, 0).await?;
            let per = rate / pairs.max(1) as f64;
            let r = run_flows(&meter, p, size, Mode::Rate(per), args.warmup, args.duration).await;
            let mut v = r.summary(&meter, size);
            merge(&mut v, json!({ "target_pps": rate }));
            v
        }
        Workload::Blast { flows, size } => {
            check_size(size)?;
            let p = make_pairs(&target, &rx_target, args.src_net, flows, 0).await?;
            let r = run_flows(&meter, p, size, Mode::Blast, args.warmup, args.duration).await;
            r.summary(&meter, size)
        }
        Workload::Idle {
            conns,
            concurrency,
            settle,
            pairs,
        } => {
            if conns + 4 * pairs + 64 > usize::try_from(nofile).unwrap_or(usize::MAX) {
                bail!("{conns} connections need more than the fd limit {nofile}");
            }
            let before_pps = if pairs > 0 {
                let p = make_pairs(&target, &rx_target, args.src_net, pairs, 0).await?;
                let r = run_flows(
                    &meter,
                    p,
                    1400,
                    Mode::Window(24),
                    args.warmup,
                    args.duration,
                )
                .await;
                Some(r.summary(&meter, 1400))
            } else {
                None
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss0 = meter.rss();
            let (fleet, secs) = connect_fleet(&target, args.src_net, conns, concurrency).await?;
            tokio::time::sleep(Duration::from_secs_f64(settle)).await;
            let rss1 = meter.rss();
            let with_pps = if pairs > 0 {
                let p = make_pairs(&target, &rx_target, args.src_net, pairs, 200).await?;
                let r = run_flows(
                    &meter,
                    p,
                    1400,
                    Mode::Window(24),
                    args.warmup,
                    args.duration,
                )
                .await;
                Some(r.summary(&meter, 1400))
            } else {
                None
            };
            let n = fleet.len();
            drop(fleet);
            let pps = |v: &Option<Value>| v.as_ref().and_then(|v| v["delivered_pps"].as_f64());
            json!({
                "conns": n,
                "connect_s": secs,
                "storm_conns_per_s": n as f64 / secs,
                "rss_before_kib": rss0,
                "rss_after_kib": rss1,
                "kib_per_conn": rss1.saturating_sub(rss0) as f64 / n.max(1) as f64,
                "active_pps_before": pps(&before_pps),
                "active_pps_with_idle": pps(&with_pps),
                "active_ratio": match (pps(&before_pps), pps(&with_pps)) {
                    (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                    _ => None,
                },
                "active_before": before_pps,
                "active_with_idle": with_pps,
            })
        }
        Workload::Churn { concurrency } => churn(&target, &meter, &args, concurrency).await,
        Workload::MeshCerts { dir } => {
            let ca = derper::bench::LoopbackCa::generate().context("generating the test CA")?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, pem) in [
                ("ca.pem", &ca.ca_pem),
                ("127.0.0.1.crt", &ca.leaf_pem),
                ("127.0.0.1.key", &ca.leaf_key_pem),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, pem)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            json!({ "dir": dir.display().to_string(), "leaf_pin": ca.leaf_pin })
        }
        Workload::Stun { sockets, window } => {
            let sa = args.stun_addr.context("--stun-addr is required for stun")?;
            stun(sa, &meter, &args, sockets, window).await?
        }
    };
    merge(
        &mut v,
        json!({ "workload": format!("{:?}", args.workload), "nofile": nofile }),
    );
    Ok(v)
}

fn check_size(size: usize) -> anyhow::Result<()> {
    if size < MIN_SIZE {
        bail!("--size must be at least {MIN_SIZE} bytes (sequence number + timestamp)");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = epoch();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let v = rt.block_on(run(args))?;
    println!("{v}");
    Ok(())
}
