//! One DERP connection: handshake, the reader (this task) and the writer (a spawned task
//! that solely owns the write half) — spec §5.1, §6.4, §6.7.
//!
//! Other connections hand packets to this one through its
//! [`ConnShared`](super::queue::ConnShared): two bounded queues (disco and data, head-drop
//! when full), a control queue (PeerGone, PeerPresent, Health), and a one-slot pong. The
//! writer drains everything that is queued, encodes it into one buffer and flushes once per
//! batch under the write timeout.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span, debug, trace, warn};

use super::queue::{ConnShared, Ctrl, Enqueued, SendState, lock};
use super::registry::Lookup;
use super::{ConnInfo, Server};
use crate::key::NodePublicKey;
use crate::metrics::{DropReason, Metrics};
use crate::proto::codec::{self, ClientFrame, FrameReader, ReadError, ReadPolicy};
use crate::proto::handshake;
use crate::proto::{
    FrameType, PEER_PRESENT_IS_MESH_PEER, PEER_PRESENT_IS_PROBER, PEER_PRESENT_IS_REGULAR,
    PEER_PRESENT_NOT_IDEAL, PeerGoneReason, looks_like_disco,
};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Local (per-connection) counters flushed to the shared metrics in batches.
#[derive(Debug, Default)]
struct ReadCounters {
    pkts_disco: u64,
    pkts_other: u64,
    bytes: u64,
    unknown: u64,
}

impl ReadCounters {
    fn flush(&mut self, m: &Metrics) {
        if self.pkts_disco > 0 {
            m.packets_received_disco.inc_by(self.pkts_disco);
        }
        if self.pkts_other > 0 {
            m.packets_received_other.inc_by(self.pkts_other);
        }
        if self.bytes > 0 {
            m.bytes_received.inc_by(self.bytes);
        }
        if self.unknown > 0 {
            m.unknown_frames.inc_by(self.unknown);
        }
        *self = Self::default();
    }
}

/// Keys this connection delivered packets to (spec §6.5), with a one-entry fast path so a
/// stream of packets to the same peer costs no hashing.
#[derive(Debug, Default)]
struct SentTo {
    last: Option<NodePublicKey>,
    /// Last (remote src, dst) pair of a forwarded packet (mesh connections only).
    last_fwd: Option<(NodePublicKey, NodePublicKey)>,
    seen: HashSet<NodePublicKey, super::registry::KeyHasher>,
}

/// Token bucket for PeerGone(NotHere) replies (spec §6.5: 1/s, burst 3).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new() -> Self {
        Self {
            tokens: crate::defaults::NOT_HERE_BURST,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * crate::defaults::NOT_HERE_PER_SEC)
            .min(crate::defaults::NOT_HERE_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn write_with_timeout<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    timeout: Option<Duration>,
) -> Result<(), &'static str> {
    let fut = async {
        w.write_all(buf).await?;
        w.flush().await
    };
    match timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("write_error"),
            Err(_) => Err("write_timeout"),
        },
        None => fut.await.map_err(|_| "write_error"),
    }
}

/// Where a DERP connection starts for the layers above (the HTTP surface, tests): the
/// connection code extends the core's [`Server`] here, so the core does not depend on it.
impl Server {
    /// Runs a DERP connection on an already-upgraded stream (after the HTTP layer, or on a
    /// `tokio::io::duplex` pipe in tests). `initial` holds bytes already read past the
    /// request head. Returns when the connection ends.
    pub async fn handle_derp<S>(&self, stream: S, initial: BytesMut, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        serve(self.clone(), stream, initial, info).await;
    }

    /// Like [`handle_derp`](Self::handle_derp), but returns once the client is admitted:
    /// the connection goes on in a tracked task of its own, so the caller's task (and all
    /// of its state) ends.
    pub(crate) async fn handle_derp_detached<S>(&self, stream: S, initial: BytesMut, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        serve_detached(self.clone(), stream, initial, info).await;
    }
}

/// Runs one DERP connection from the ServerKey frame to the end. `initial` holds bytes the
/// client already sent after the HTTP request head.
pub(crate) async fn serve<S>(server: Server, stream: S, initial: BytesMut, info: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(r) = handshake(server, stream, initial, info).await {
        r.run().await;
    }
}

/// Like [`serve`], but once the client is admitted the connection continues in a task of
/// its own and this returns. The caller's task (accept, TLS handshake, HTTP request head:
/// several KiB of future state) ends instead of staying alive, at its largest size, for
/// the life of the connection (T5).
pub(crate) async fn serve_detached<S>(server: Server, stream: S, initial: BytesMut, info: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(r) = handshake(server, stream, initial, info).await {
        let server = r.server.clone();
        server.spawn_tracked(r.run());
    }
}

/// An admitted client, between the DERP handshake and registration.
struct Admitted<S> {
    server: Server,
    reader: FrameReader<tokio::io::ReadHalf<S>>,
    wr: WriteHalf<S>,
    key: NodePublicKey,
    /// The client said it is a prober (the rest of its ClientInfo is not kept).
    is_prober: bool,
    can_mesh: bool,
    info: ConnInfo,
    cancel: CancellationToken,
}

impl<S> Admitted<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    async fn run(self) {
        let Admitted {
            server,
            reader,
            wr,
            key,
            is_prober,
            can_mesh,
            info,
            cancel,
        } = self;
        run_registered(server, reader, wr, key, is_prober, can_mesh, info, cancel).await;
    }
}

/// The DERP handshake (spec §5.1): ServerKey out, ClientInfo in, admission. `None` if the
/// connection ended or was refused (already counted and logged).
async fn handshake<S>(
    server: Server,
    stream: S,
    initial: BytesMut,
    mut info: ConnInfo,
) -> Option<Admitted<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let m = server.metrics().clone();
    let opts = server.options().clone();
    m.accepts.inc();
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, initial, ReadPolicy::FromClient);

    // spec §5.1: write ServerKey (10 s), read ClientInfo (10 s).
    let mut out = BytesMut::with_capacity(info.prelude.len() + 64);
    out.extend_from_slice(&info.prelude);
    // Not needed again; do not keep it for the life of the connection (T5).
    info.prelude = Bytes::new();
    handshake::write_server_key(&mut out, &server.public_key());
    if write_with_timeout(&mut wr, &out, Some(opts.server_key_timeout))
        .await
        .is_err()
    {
        m.handshake_failure("server_key_write");
        return None;
    }
    let cancel = server.cancel_token().child_token();
    let first = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = tokio::time::timeout(opts.client_info_timeout, reader.read_frame()) => r,
    };
    let payload = match first {
        Err(_) => {
            m.handshake_failure("timeout");
            debug!(remote = ?info.remote, "handshake timed out");
            return None;
        }
        Ok(Err(ReadError::TooLarge { .. })) => {
            m.handshake_failure("long_client_info");
            return None;
        }
        Ok(Err(ReadError::Io(e))) => {
            // A limit of our TLS record layer counts under its own name.
            m.handshake_failure(crate::tls_stream::error_reason(&e).unwrap_or("eof"));
            return None;
        }
        Ok(Err(_)) | Ok(Ok(None)) => {
            m.handshake_failure("eof");
            return None;
        }
        Ok(Ok(Some(f))) if f.typ != FrameType::ClientInfo as u8 => {
            m.handshake_failure("wrong_frame_type");
            return None;
        }
        Ok(Ok(Some(f))) => f.payload,
    };
    let opened = handshake::open_client_info(server.private_key(), &payload);
    // The payload shares the HTTP layer's read buffer; release it now rather than for the
    // life of the connection (T5).
    drop(payload);
    let (key, client_info) = match opened {
        Ok(x) => x,
        Err(e) => {
            m.handshake_failure(match e {
                crate::proto::DecodeError::TooShort { .. } => "short_client_info",
                crate::proto::DecodeError::BadJson => "bad_json",
                crate::proto::DecodeError::SmallOrderKey => "small_order_key",
                _ => "bad_box",
            });
            debug!(remote = ?info.remote, error = %e, "client info rejected");
            return None;
        }
    };
    let can_mesh = match (&opts.mesh_key, &client_info.mesh_key) {
        (Some(mk), Some(theirs)) => mk.matches_hex(theirs),
        _ => false,
    };
    if client_info.mesh_key.is_some() && !can_mesh {
        // Treated as a regular client (no privileges, admission applies), as upstream.
        m.mesh_key_mismatches.inc();
        if let Some(suppressed) = MESH_MISMATCH_LOG.check() {
            warn!(
                remote = ?info.remote,
                suppressed,
                "client presented a mesh key that does not match ours (or we have none); \
                 treating it as a regular client without mesh privileges"
            );
        }
    }
    if !can_mesh && !opts.admission.is_empty() {
        let source = info.remote.map(|a| a.ip());
        let decision = tokio::select! {
            _ = cancel.cancelled() => return None,
            d = crate::admission::check_all(&opts.admission, &key, source) => d,
        };
        if let crate::admission::Decision::Reject { reason, detail } = decision {
            m.admission_rejection(reason);
            if let Some(suppressed) = ADMISSION_LOG.check() {
                warn!(
                    remote = ?info.remote,
                    client = %key.short(),
                    reason,
                    suppressed,
                    "client rejected: {detail}"
                );
            }
            return None;
        }
    }
    // Admitted: no longer counted as handshaking.
    info.handshake_slot.release();
    info.handshake_slot = Default::default();
    Some(Admitted {
        server,
        reader,
        wr,
        key,
        is_prober: client_info.is_prober,
        can_mesh,
        info,
        cancel,
    })
}

static MESH_MISMATCH_LOG: std::sync::LazyLock<crate::ratelimit::LogLimiter> =
    std::sync::LazyLock::new(|| crate::ratelimit::LogLimiter::new(Duration::from_secs(5)));
static ADMISSION_LOG: std::sync::LazyLock<crate::ratelimit::LogLimiter> =
    std::sync::LazyLock::new(|| crate::ratelimit::LogLimiter::new(Duration::from_secs(1)));

#[allow(clippy::too_many_arguments)]
async fn run_registered<S>(
    server: Server,
    mut reader: FrameReader<tokio::io::ReadHalf<S>>,
    mut wr: WriteHalf<S>,
    key: NodePublicKey,
    is_prober: bool,
    can_mesh: bool,
    info: ConnInfo,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let m = server.metrics().clone();
    let opts = server.options().clone();
    let mut flags = 0;
    if can_mesh {
        flags |= PEER_PRESENT_IS_MESH_PEER;
    }
    if is_prober {
        flags |= PEER_PRESENT_IS_PROBER;
    }
    if info.not_ideal {
        flags |= PEER_PRESENT_NOT_IDEAL;
    }
    if flags == 0 {
        flags = PEER_PRESENT_IS_REGULAR;
    }
    let write_timeout = if can_mesh {
        Some(opts.mesh_write_timeout)
    } else {
        opts.write_timeout
    };
    let conn = Arc::new(ConnShared {
        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
        key,
        remote: info.remote,
        present_flags: flags,
        cancel: cancel.clone(),
        dup: AtomicBool::new(false),
        state: Mutex::new(SendState::default()),
        notify: Notify::new(),
        data_depth: opts.queue_depth.max(1),
        disco_depth: opts.disco_queue_depth.max(1),
    });
    let span = tracing::debug_span!("conn", key = %key, id = conn.id, remote = ?info.remote);
    async {
        let registry = server.registry();
        registry.register(&conn);
        if info.not_ideal {
            m.current_notideal_connections.inc();
        }
        debug!(mesh = can_mesh, "client registered");

        // spec §5.1 / P12: ServerInfo is the first frame after ServerKey.
        let mut out = BytesMut::with_capacity(128);
        handshake::write_server_info(
            &mut out,
            server.private_key(),
            &key,
            &handshake::random_nonce(),
        );
        let writer = if write_with_timeout(&mut wr, &out, write_timeout)
            .await
            .is_ok()
        {
            let w = Writer {
                conn: conn.clone(),
                metrics: m.clone(),
                write_timeout,
                keepalive: opts.keepalive + jitter(opts.keepalive_jitter),
                server_cancel: server.cancel_token(),
            };
            Some(tokio::spawn(w.run(wr, out).instrument(Span::current())))
        } else {
            cancel.cancel();
            None
        };

        let reason = if writer.is_some() {
            read_loop(&server, &conn, &mut reader, can_mesh).await
        } else {
            "write_error"
        };
        debug!(reason, "client disconnected");
        cancel.cancel();
        registry.unregister(&conn);
        registry.remove_watcher(&conn);
        if info.not_ideal {
            m.current_notideal_connections.dec();
        }
        let writer_reason = match writer {
            Some(h) => h.await.unwrap_or(None),
            None => None,
        };
        m.disconnect(writer_reason.unwrap_or(reason));
    }
    .instrument(span)
    .await;
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random::<u64>() % ms)
}

/// Why the reader stopped on cancellation: the whole server is shutting down, or just this
/// connection was closed.
fn closed_reason(server: &Server) -> &'static str {
    if server.cancel_token().is_cancelled() {
        "shutdown"
    } else {
        "closed"
    }
}

/// The reader: returns the disconnect reason.
async fn read_loop<R: AsyncRead + Unpin>(
    server: &Server,
    conn: &Arc<ConnShared>,
    reader: &mut FrameReader<R>,
    can_mesh: bool,
) -> &'static str {
    let m = server.metrics();
    let registry = server.registry();
    let mut counters = ReadCounters::default();
    let mut sent_to = SentTo::default();
    let mut not_here = Bucket::new();
    let mut preferred = false;
    let connected_at = Instant::now();
    let mut since_yield = 0u32;
    // Per-client receive limit (spec §6.8): mesh peers are exempt.
    let mut recv_bucket = if can_mesh {
        None
    } else {
        server.options().recv_rate.map(|r| r.bucket())
    };
    // One cancellation future for the whole connection: building one per frame would
    // register and remove a waiter in the token (two mutex round trips) every time.
    let cancelled = conn.cancel.cancelled();
    tokio::pin!(cancelled);
    let reason = loop {
        if reader.buffer_is_empty() {
            counters.flush(m);
            since_yield = 0;
        } else {
            since_yield += 1;
            if since_yield >= FRAMES_PER_TURN {
                // Frames already buffered are processed without awaiting I/O, so the task
                // would not yield on its own; the writers it woke (possibly parked in this
                // worker's LIFO slot) must get to run (performance.md §7: fairness).
                since_yield = 0;
                counters.flush(m);
                tokio::task::yield_now().await;
                if conn.cancel.is_cancelled() {
                    break closed_reason(server);
                }
            }
        }
        // A frame already buffered needs no I/O, so there is nothing to race against
        // cancellation (polling the token takes its mutex: once per frame was ≈ 2 % of the
        // relay's CPU on 64-byte packets). Cancellation is checked every FRAMES_PER_TURN
        // frames and whenever the reader waits for the socket.
        let raw = if let Some(b) = &mut recv_bucket {
            // Per-client receive limit (spec §6.8), as upstream: wait on the limiter for the
            // frame's declared length *before* its payload is read, so a limited client's
            // bytes stay in its socket (TCP pushes back on it) instead of in our buffer.
            let hdr = tokio::select! {
                biased;
                _ = &mut cancelled => break closed_reason(server),
                r = reader.next_header() => r,
            };
            match hdr {
                Ok(Some((_, len))) => {
                    #[allow(clippy::cast_precision_loss)]
                    let wait = b.take(len as f64);
                    if !wait.is_zero() {
                        m.rate_limit_waited.inc();
                        tokio::select! {
                            biased;
                            _ = &mut cancelled => break closed_reason(server),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = &mut cancelled => break closed_reason(server),
                        r = reader.read_frame_exact() => r,
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            match reader.try_frame() {
                Ok(Some(f)) => Ok(Some(f)),
                Err(e) => Err(e),
                Ok(None) => tokio::select! {
                    biased;
                    _ = &mut cancelled => break closed_reason(server),
                    r = reader.read_frame() => r,
                },
            }
        };
        let raw = match raw {
            Ok(Some(r)) => r,
            Ok(None) => break "eof",
            Err(ReadError::TooLarge { .. }) => break "frame_too_large",
            Err(ReadError::UnexpectedEof) => break "truncated_frame",
            Err(ReadError::Io(e)) => {
                break crate::tls_stream::error_reason(&e).unwrap_or("read_error");
            }
        };
        if conn.dup.load(Ordering::Relaxed) {
            registry.note_heard(conn);
        }
        trace!(typ = raw.typ, len = raw.payload.len(), "frame");
        let frame = match codec::decode_client_frame(raw.typ, raw.payload) {
            Ok(f) => f,
            Err(_) => break "protocol_violation",
        };
        match frame {
            ClientFrame::SendPacket { dst, packet } => {
                let disco = looks_like_disco(&packet);
                if disco {
                    counters.pkts_disco += 1;
                } else {
                    counters.pkts_other += 1;
                }
                counters.bytes += packet.len() as u64;
                deliver(
                    server,
                    conn,
                    conn.key,
                    dst,
                    packet,
                    disco,
                    &mut sent_to,
                    &mut not_here,
                    DropReason::UnknownDest,
                );
            }
            ClientFrame::ForwardPacket { src, dst, packet } => {
                if !can_mesh {
                    break "mesh_frame_without_mesh_key";
                }
                m.packets_forwarded_in.inc();
                let disco = looks_like_disco(&packet);
                // Forwarded packets are never forwarded again (spec §6.10).
                deliver(
                    server,
                    conn,
                    src,
                    dst,
                    packet,
                    disco,
                    &mut sent_to,
                    &mut not_here,
                    DropReason::UnknownDestOnFwd,
                );
            }
            ClientFrame::NotePreferred(p) => {
                if p != preferred {
                    preferred = p;
                    if p {
                        m.current_home_connections.inc();
                    } else {
                        m.current_home_connections.dec();
                    }
                    if connected_at.elapsed() > Duration::from_secs(5) {
                        if p {
                            m.home_moves_in.inc();
                        } else {
                            m.home_moves_out.inc();
                        }
                    }
                }
            }
            ClientFrame::WatchConns => {
                if !can_mesh {
                    break "mesh_frame_without_mesh_key";
                }
                if conn.key != server.public_key() {
                    registry.add_watcher(conn);
                }
            }
            ClientFrame::ClosePeer(k) => {
                if !can_mesh {
                    break "mesh_frame_without_mesh_key";
                }
                registry.close_key(&k);
            }
            ClientFrame::Ping(d) => {
                m.got_ping.inc();
                conn.set_pong(d);
            }
            ClientFrame::ClientInfo(_) | ClientFrame::Other(_) => counters.unknown += 1,
        }
    };
    counters.flush(m);
    if preferred {
        m.current_home_connections.dec();
    }
    reason
}

#[allow(clippy::too_many_arguments)]
fn deliver(
    server: &Server,
    conn: &Arc<ConnShared>,
    src: NodePublicKey,
    dst: NodePublicKey,
    packet: Bytes,
    disco: bool,
    sent_to: &mut SentTo,
    not_here: &mut Bucket,
    unknown_reason: DropReason,
) {
    let m = server.metrics();
    let len = packet.len();
    let forwarded = unknown_reason == DropReason::UnknownDestOnFwd;
    let mut pkt = Some(packet);
    let lookup = server.registry().with_active(&dst, |c| match pkt.take() {
        Some(p) => c.enqueue(src, p, disco),
        None => Enqueued::Gone,
    });
    match lookup {
        Lookup::Found(Enqueued::Queued) => {}
        Lookup::Found(Enqueued::QueuedHeadDrop(n)) => {
            m.drop_packet(DropReason::QueueHead, disco, n);
        }
        Lookup::Found(Enqueued::Gone) => {
            m.drop_packet(DropReason::GoneDisconnected, disco, len);
            return;
        }
        Lookup::NoActive => {
            m.drop_packet(DropReason::DupClient, disco, len);
            return;
        }
        // Forwarded packets are never forwarded again (spec §6.10: one hop, no loops).
        Lookup::Remote(fwd) if !forwarded => {
            if let Some(p) = pkt.take()
                && fwd.forward(src, dst, p)
            {
                m.packets_forwarded_out.inc();
            } else {
                m.mesh_forward_drops.inc();
            }
            return;
        }
        Lookup::Remote(_) | Lookup::Unknown => {
            m.drop_packet(unknown_reason, disco, len);
            if disco && not_here.allow() {
                conn.push_ctrl(Ctrl::PeerGone(dst, PeerGoneReason::NotHere));
            }
            return;
        }
    }
    if forwarded {
        // Remember who received from the remote sender, so they get PeerGone when it
        // leaves the region (spec §6.5). One-entry fast path per (src, dst) stream.
        if sent_to.last_fwd != Some((src, dst)) {
            sent_to.last_fwd = Some((src, dst));
            server.registry().note_sent_to(&src, dst);
        }
    } else if src == conn.key && sent_to.last != Some(dst) {
        sent_to.last = Some(dst);
        if sent_to.seen.insert(dst) {
            server.registry().note_sent_to(&src, dst);
        }
    }
}

struct Writer {
    conn: Arc<ConnShared>,
    metrics: Arc<Metrics>,
    write_timeout: Option<Duration>,
    keepalive: Duration,
    server_cancel: CancellationToken,
}

/// Bytes buffered before a batch is written even if more is queued.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Frames a reader processes from its buffer before yielding to other tasks.
const FRAMES_PER_TURN: u32 = 32;
/// Largest write buffer kept while a connection is idle.
const IDLE_BUF_MAX: usize = 64 * 1024;

impl Writer {
    /// Returns a disconnect reason if the writer ended the connection.
    async fn run<W: AsyncWrite + Unpin>(
        self,
        mut wr: W,
        mut out: BytesMut,
    ) -> Option<&'static str> {
        let conn = &self.conn;
        let m = &self.metrics;
        let mut ka = tokio::time::interval_at(Instant::now() + self.keepalive, self.keepalive);
        ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut data = VecDeque::new();
        let mut disco = VecDeque::new();
        let mut ctrl = VecDeque::new();
        let mut result = None;
        let mut aborted = false;
        // Created once, not per batch (see read_loop).
        let cancelled = conn.cancel.cancelled();
        tokio::pin!(cancelled);
        'outer: loop {
            out.clear();
            let pong = {
                let mut st = lock(&conn.state);
                std::mem::swap(&mut st.data, &mut data);
                std::mem::swap(&mut st.disco, &mut disco);
                std::mem::swap(&mut st.ctrl, &mut ctrl);
                st.pong.take()
            };
            if data.is_empty() && disco.is_empty() && ctrl.is_empty() && pong.is_none() {
                if out.capacity() > IDLE_BUF_MAX {
                    // Do not keep a burst-sized buffer on an idle connection.
                    out = BytesMut::new();
                }
                tokio::select! {
                    biased;
                    _ = &mut cancelled => break 'outer,
                    _ = conn.notify.notified() => continue 'outer,
                    _ = ka.tick() => {
                        codec::write_keepalive(&mut out);
                        m.keepalives_sent.inc();
                    }
                }
            }
            let (mut pkts, mut bytes) = (0u64, 0u64);
            let (mut gone_disc, mut gone_here, mut pongs) = (0u64, 0u64, 0u64);
            if let Some(p) = pong {
                codec::write_pong(&mut out, &p);
                pongs += 1;
            }
            for c in ctrl.drain(..) {
                match c {
                    Ctrl::PeerGone(k, r) => {
                        codec::write_peer_gone(&mut out, &k, r);
                        if r == PeerGoneReason::NotHere {
                            gone_here += 1;
                        } else {
                            gone_disc += 1;
                        }
                    }
                    Ctrl::PeerPresent { key, addr, flags } => {
                        codec::write_peer_present(&mut out, &key, addr, flags)
                    }
                    Ctrl::Health(t) => codec::write_health(&mut out, &t),
                }
            }
            // Disco first: it is small and latency-sensitive (spec §6.4).
            while let Some(p) = disco.pop_front().or_else(|| data.pop_front()) {
                codec::write_recv_packet(&mut out, &p.src, &p.data);
                pkts += 1;
                bytes += p.data.len() as u64;
                if out.len() >= MAX_BATCH_BYTES {
                    break;
                }
            }
            if !data.is_empty() || !disco.is_empty() {
                // Put the rest back at the front so ordering is preserved.
                let mut st = lock(&conn.state);
                while let Some(p) = data.pop_back() {
                    st.data.push_front(p);
                }
                while let Some(p) = disco.pop_back() {
                    st.disco.push_front(p);
                }
            }
            // Cancellation also interrupts a write in progress, so a peer that never reads
            // cannot pin this task when writes have no deadline (`--tcp-write-timeout 0`).
            let res = tokio::select! {
                biased;
                r = write_with_timeout(&mut wr, &out, self.write_timeout) => r,
                _ = &mut cancelled => {
                    aborted = true;
                    break;
                }
            };
            if let Err(reason) = res {
                if reason == "write_timeout" {
                    m.sclient_write_timeouts.inc();
                }
                for _ in 0..pkts {
                    m.drop_packet(DropReason::WriteError, false, 0);
                }
                result = Some(reason);
                break;
            }
            if pkts > 0 {
                m.packets_sent.inc_by(pkts);
                m.bytes_sent.inc_by(bytes);
            }
            if pongs > 0 {
                m.sent_pong.inc_by(pongs);
            }
            if gone_disc > 0 {
                m.peer_gone_disconnected_frames.inc_by(gone_disc);
            }
            if gone_here > 0 {
                m.peer_gone_not_here_frames.inc_by(gone_here);
            }
        }
        // Mark closed and count what is left as gone_disconnected (spec §6.4).
        let leftover = {
            let mut st = lock(&conn.state);
            st.closed = true;
            let mut v: Vec<(bool, usize)> = Vec::new();
            v.extend(st.data.drain(..).map(|p| (false, p.data.len())));
            v.extend(st.disco.drain(..).map(|p| (true, p.data.len())));
            st.ctrl.clear();
            v
        };
        for (d, n) in leftover {
            m.drop_packet(DropReason::GoneDisconnected, d, n);
        }
        conn.cancel.cancel();
        if result.is_none() && !aborted && self.server_cancel.is_cancelled() {
            // Graceful shutdown: tell the client we are restarting (spec §6.11).
            out.clear();
            codec::write_restarting(
                &mut out,
                crate::defaults::RESTART_RECONNECT_IN_MS,
                crate::defaults::RESTART_TRY_FOR_MS,
            );
            let _ = write_with_timeout(&mut wr, &out, Some(Duration::from_secs(1))).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
        result
    }
}
