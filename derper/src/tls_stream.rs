//! Server-side TLS over rustls' unbuffered (sans-I/O) API, for the relay's listeners.
//!
//! `tokio-rustls` wraps rustls' buffered `ServerConnection`, whose receive buffer stays at
//! 4 KiB for the life of the connection even when nothing arrives. A relay holds thousands
//! of idle connections (performance.md §3.5, T5), so [`TlsServerStream`] keeps its own
//! buffers and holds none while idle:
//!
//! * reads go through a buffer on the stack; only a partial record left at the end of a
//!   read, or decrypted bytes the caller had no room for, are copied to the heap, and those
//!   heap buffers are freed as soon as they drain;
//! * writes are encrypted into a heap buffer that is freed once the socket took it all.
//!
//! TLS 1.3 records after the handshake are `records`' business (including its limits on
//! hostile peers); TLS 1.2 stays with rustls. What the read side may add to the send
//! buffer (KeyUpdate replies, alerts) is capped at [`MAX_TX_FROM_READER`] bytes, so a
//! peer that sends and never reads cannot make it grow. Not here: the rustls
//! configuration ([`crate::tls`]) and the client side.
#![warn(clippy::indexing_slicing)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket per `read(2)`: a full TLS record (16 KiB of plaintext plus
/// header, content type, padding allowance and tag) and then some, so one read can pull
/// several small records.
const READ_CHUNK: usize = 32 * 1024;
/// Per-record expansion of AEAD ciphertext over plaintext (header 5 + content type 1 +
/// tag 16), used to size the first encryption attempt; rustls reports the exact size if
/// that is not enough.
const RECORD_OVERHEAD: usize = 22;
/// Largest TLS plaintext fragment.
const MAX_FRAGMENT: usize = 16 * 1024;
/// Bytes the read side may add to the send buffer (KeyUpdate replies, alerts) until the
/// socket has taken them: a peer that sends and never reads must not make it grow. Our
/// record layer needs one KeyUpdate and one alert record at most (51 bytes): it answers
/// KeyUpdate requests only into an empty send buffer, coalescing the rest.
pub(crate) const MAX_TX_FROM_READER: u16 = 1024;

/// A server TLS connection over a [`TcpStream`], after the handshake.
///
/// Implements [`AsyncRead`] and [`AsyncWrite`]; split it with `tokio::io::split` for one
/// reader and one writer task (all its state sits behind that split's lock).
pub(crate) struct TlsServerStream {
    tcp: TcpStream,
    engine: Engine,
    /// Received TLS bytes rustls has not consumed yet (an incomplete record).
    rx: Vec<u8>,
    /// Decrypted application data the reader had no room for; `plain[plain_pos..]` is left.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes not yet written; `tx[tx_pos..]` is left.
    tx: Vec<u8>,
    tx_pos: usize,
    /// rustls may hold decrypted records already (the client's first data came in the same
    /// read as its Finished), so the next read runs rustls before reading the socket.
    conn_has_data: bool,
    /// The peer sent close_notify or closed its side.
    read_eof: bool,
    /// close_notify has been queued.
    close_queued: bool,
    /// A fatal TLS error ended the connection (an alert may be on its way).
    failed: bool,
    /// Bytes the read side added to `tx` since it was last empty ([`MAX_TX_FROM_READER`]).
    tx_from_reader: u16,
    /// The reader's waker, when it waits for the socket: the write side may decrypt
    /// application data while handling rustls' state and must then wake it.
    read_waker: Option<Waker>,
    /// Largest capacity `tx` had when the read side flushed it (tests).
    #[cfg(test)]
    tx_peak: usize,
}

/// Who protects records after the handshake.
enum Engine {
    /// TLS 1.3: [`records::Records`] on the keys rustls extracted (no allocation per
    /// record, less state per connection).
    Records(Box<records::Records>),
    /// TLS 1.2, or a configuration without secret extraction: rustls' unbuffered
    /// connection does everything.
    Rustls(Box<UnbufferedServerConnection>),
}

/// Run `engine` over received TLS bytes; application data goes to `sink`, TLS-layer
/// replies from rustls to `tx`, which may grow to `tx_limit` bytes. (Our record layer
/// only notes a KeyUpdate it owes; [`TlsServerStream::answer_key_update`] sends it.)
fn process_engine(
    engine: &mut Engine,
    data: &mut [u8],
    sink: &mut Sink<'_, '_>,
    tx: &mut Vec<u8>,
    tx_limit: usize,
) -> io::Result<Processed> {
    match engine {
        Engine::Rustls(conn) => process(conn, data, sink, tx, tx_limit),
        Engine::Records(r) => {
            let mut delivered = false;
            let o = r.open(data, |content| {
                delivered |= !content.is_empty();
                sink.put(content);
            })?;
            Ok(Processed {
                consumed: o.consumed,
                data: delivered,
                eof: o.eof,
            })
        }
    }
}

impl std::fmt::Debug for TlsServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServerStream")
            .field("tcp", &self.tcp)
            .field("rx", &self.rx.len())
            .field("plain", &(self.plain.len() - self.plain_pos))
            .field("tx", &(self.tx.len() - self.tx_pos))
            .field("read_eof", &self.read_eof)
            .finish_non_exhaustive()
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Run the server handshake on `tcp` with `config`. The caller bounds it in time.
///
/// # Errors
/// I/O errors, a TLS error from rustls (`InvalidData`), or `UnexpectedEof` if the client
/// goes away mid-handshake.
pub(crate) async fn accept(
    config: Arc<ServerConfig>,
    mut tcp: TcpStream,
) -> io::Result<TlsServerStream> {
    let extract = config.enable_secret_extraction;
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
    let mut rx: Vec<u8> = Vec::new();
    let mut tx: Vec<u8> = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut rx);
        let mut transmit = false;
        let mut need_read = false;
        let mut done = false;
        let mut has_data = false;
        match state.map_err(tls_err)? {
            ConnectionState::EncodeTlsData(mut e) => encode_into(&mut e, &mut tx, usize::MAX)?,
            ConnectionState::TransmitTlsData(t) => {
                t.done();
                transmit = true;
            }
            ConnectionState::BlockedHandshake => need_read = true,
            // Handshake complete; any application data that came with the client's last
            // flight stays in rustls (or in `rx`) for the first read.
            ConnectionState::WriteTraffic(_) => done = true,
            ConnectionState::ReadTraffic(_) => {
                done = true;
                has_data = true;
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state during handshake: {other:?}"),
                ));
            }
        }
        rx.drain(..discard.min(rx.len()));
        if transmit || (done && !tx.is_empty()) {
            tcp.write_all(&tx).await?;
            tx = Vec::new();
        }
        if done {
            let mut plain = Vec::new();
            let mut read_eof = false;
            let engine = if extract && conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
                // Let rustls finish what it holds (records that came with the client's
                // Finished), then take its keys and protect records ourselves.
                let mut sink = Sink {
                    out: None,
                    plain: &mut plain,
                };
                let p = process(&mut conn, &mut rx, &mut sink, &mut tx, usize::MAX)?;
                rx.drain(..p.consumed);
                read_eof = p.eof;
                if !tx.is_empty() {
                    tcp.write_all(&tx).await?;
                }
                let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
                Engine::Records(Box::new(records::Records::new(kernel, secrets)?))
            } else {
                Engine::Rustls(Box::new(conn))
            };
            let conn_has_data = has_data && matches!(engine, Engine::Rustls(_));
            return Ok(TlsServerStream {
                tcp,
                engine,
                rx: if rx.is_empty() { Vec::new() } else { rx },
                plain,
                plain_pos: 0,
                tx: Vec::new(),
                tx_pos: 0,
                conn_has_data,
                read_eof,
                close_queued: false,
                failed: false,
                tx_from_reader: 0,
                read_waker: None,
                #[cfg(test)]
                tx_peak: 0,
            });
        }
        if need_read {
            let mut chunk = [0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            rx.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// Append the handshake record(s) of `e` to `tx`, which may not grow past `limit` bytes
/// (an error that leaves `tx` as it was).
fn encode_into(
    e: &mut EncodeTlsData<'_, ServerConnectionData>,
    tx: &mut Vec<u8>,
    limit: usize,
) -> io::Result<()> {
    let start = tx.len();
    let room = limit.saturating_sub(start);
    let mut want = room.min(1024);
    loop {
        tx.resize(start + want, 0);
        match e.encode(tx.get_mut(start..).unwrap_or_default()) {
            Ok(n) => {
                tx.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                tx.truncate(start);
                return Err(send_buffer_limit());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > want =>
            {
                want = required_size;
            }
            Err(e) => {
                tx.truncate(start);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

/// Append `data` encrypted as application data records to `tx`.
fn encrypt_into(
    w: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
    tx: &mut Vec<u8>,
) -> io::Result<()> {
    let start = tx.len();
    let records = data.len().div_ceil(MAX_FRAGMENT).max(1);
    let mut want = data.len() + records * RECORD_OVERHEAD;
    loop {
        tx.resize(start + want, 0);
        match w.encrypt(data, tx.get_mut(start..).unwrap_or_default()) {
            Ok(n) => {
                tx.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > want =>
            {
                want = required_size;
            }
            Err(e) => {
                tx.truncate(start);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

/// What running rustls over received bytes produced.
#[derive(Debug, Default)]
struct Processed {
    /// Bytes of the input rustls is done with.
    consumed: usize,
    /// Application data was delivered (to the caller's buffer or `plain`).
    data: bool,
    /// The peer closed (close_notify).
    eof: bool,
}

/// Where decrypted application data goes: the caller's buffer first, then `plain`.
struct Sink<'a, 'b> {
    out: Option<&'a mut ReadBuf<'b>>,
    plain: &'a mut Vec<u8>,
}

impl Sink<'_, '_> {
    fn put(&mut self, mut payload: &[u8]) {
        if let Some(out) = self.out.as_deref_mut() {
            let n = payload.len().min(out.remaining());
            let (now, later) = payload.split_at(n);
            out.put_slice(now);
            payload = later;
        }
        self.plain.extend_from_slice(payload);
    }
}

/// The read side would push the send buffer past [`MAX_TX_FROM_READER`].
fn send_buffer_limit() -> io::Error {
    records::fatal(
        None,
        "tls_send_buffer_limit",
        format!(
            "TLS replies to a peer that does not read would exceed {MAX_TX_FROM_READER} bytes \
             of send buffer"
        ),
    )
}

/// Run rustls over `data` until it needs more bytes. Handshake-layer output (KeyUpdate
/// replies, alerts) is appended to `tx`, which may grow to `tx_limit` bytes; application
/// data goes to `sink`.
fn process(
    conn: &mut UnbufferedServerConnection,
    data: &mut [u8],
    sink: &mut Sink<'_, '_>,
    tx: &mut Vec<u8>,
    tx_limit: usize,
) -> io::Result<Processed> {
    let mut p = Processed::default();
    loop {
        let rest = data.get_mut(p.consumed..).unwrap_or_default();
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(rest);
        let mut stop = false;
        match state.map_err(tls_err)? {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_err)?;
                    discard += rec.discard;
                    if !rec.payload.is_empty() {
                        p.data = true;
                        sink.put(rec.payload);
                    }
                }
            }
            ConnectionState::EncodeTlsData(mut e) => encode_into(&mut e, tx, tx_limit)?,
            ConnectionState::TransmitTlsData(t) => t.done(),
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                p.eof = true;
                stop = true;
            }
            // Nothing complete left in `data`.
            ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => stop = true,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state: {other:?}"),
                ));
            }
        }
        p.consumed = (p.consumed + discard).min(data.len());
        if stop {
            return Ok(p);
        }
    }
}

impl TlsServerStream {
    /// Copy buffered plaintext into `buf`.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let left = self.plain.get(self.plain_pos..).unwrap_or_default();
        if left.is_empty() || buf.remaining() == 0 {
            return;
        }
        let n = left.len().min(buf.remaining());
        buf.put_slice(left.get(..n).unwrap_or_default());
        self.plain_pos += n;
        if self.plain_pos >= self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
    }

    /// Run rustls over `self.rx` (bytes left from earlier reads).
    fn process_rx(&mut self, out: Option<&mut ReadBuf<'_>>) -> io::Result<Processed> {
        let mut rx = std::mem::take(&mut self.rx);
        let (before, limit) = self.reader_tx_room();
        let mut sink = Sink {
            out,
            plain: &mut self.plain,
        };
        let r = process_engine(&mut self.engine, &mut rx, &mut sink, &mut self.tx, limit);
        self.reader_added(before);
        if let Ok(p) = &r {
            rx.drain(..p.consumed);
        }
        self.rx = if rx.is_empty() { Vec::new() } else { rx };
        r
    }

    /// How far the read side may grow `tx`: (its length now, the limit).
    fn reader_tx_room(&self) -> (usize, usize) {
        let room = usize::from(MAX_TX_FROM_READER.saturating_sub(self.tx_from_reader));
        (self.tx.len(), self.tx.len() + room)
    }

    /// The read side grew `tx` from `before` bytes: count it.
    fn reader_added(&mut self, before: usize) {
        let added = u16::try_from(self.tx.len().saturating_sub(before)).unwrap_or(u16::MAX);
        self.tx_from_reader = self.tx_from_reader.saturating_add(added);
    }

    /// After the read side ran the record layer: write what the socket takes, then send
    /// the KeyUpdate the peer asked for if the send buffer is empty. Otherwise it waits
    /// for the socket to take what is queued ([`Self::poll_flush_tx`]) or goes out before
    /// our next application data ([`records::Records::seal`]), answering every request
    /// received until then: whatever the peer sends, the read side holds at most one
    /// reply in the send buffer.
    fn answer_key_update(&mut self) -> io::Result<()> {
        self.try_flush_tx();
        let Engine::Records(r) = &mut self.engine else {
            return Ok(());
        };
        if !r.owes_key_update() || !self.tx.is_empty() || self.close_queued {
            return Ok(());
        }
        if usize::from(self.tx_from_reader) + records::KEY_UPDATE_RECORD_LEN
            > usize::from(MAX_TX_FROM_READER)
        {
            return Err(send_buffer_limit());
        }
        let before = self.tx.len();
        r.answer_key_update(&mut self.tx)?;
        self.reader_added(before);
        self.try_flush_tx();
        Ok(())
    }

    /// A fatal error on the read side: no more reads or writes, and the peer gets the
    /// alert the error calls for if it fits into an empty send buffer (best effort; the
    /// caller closes the connection either way).
    fn fail(&mut self, e: io::Error) -> io::Error {
        if std::mem::replace(&mut self.failed, true) {
            return e;
        }
        self.try_flush_tx();
        let alert = records::RecordError::find(&e).and_then(records::RecordError::alert);
        if let (Some(desc), Engine::Records(r)) = (alert, &mut self.engine)
            && self.tx.is_empty()
            && !self.close_queued
            && usize::from(self.tx_from_reader) + records::ALERT_RECORD_LEN
                <= usize::from(MAX_TX_FROM_READER)
        {
            let before = self.tx.len();
            if r.fatal_alert(desc, &mut self.tx).is_ok() {
                self.reader_added(before);
                self.try_flush_tx();
            }
        }
        e
    }

    /// Write out `tx`, and then the KeyUpdate the peer asked for while `tx` was busy;
    /// Ready(Ok) once it is empty (and freed).
    fn poll_flush_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.tx_pos < self.tx.len() {
                let left = self.tx.get(self.tx_pos..).unwrap_or_default();
                let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, left))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.tx_pos += n;
            }
            self.tx = Vec::new();
            self.tx_pos = 0;
            self.tx_from_reader = 0;
            match &mut self.engine {
                Engine::Records(r) if r.owes_key_update() && !self.close_queued && !self.failed => {
                    r.answer_key_update(&mut self.tx)?;
                }
                _ => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Best effort, never registers a waker: write what `tx` holds if the socket takes it.
    /// Used from the read side for rustls' own messages (KeyUpdate replies), so the read
    /// side does not steal the writer's wakeup; what is left goes out with the next write
    /// or flush.
    fn try_flush_tx(&mut self) {
        #[cfg(test)]
        {
            self.tx_peak = self.tx_peak.max(self.tx.capacity());
        }
        while self.tx_pos < self.tx.len() {
            let left = self.tx.get(self.tx_pos..).unwrap_or_default();
            match self.tcp.try_write(left) {
                Ok(n) if n > 0 => self.tx_pos += n,
                _ => return,
            }
        }
        self.tx = Vec::new();
        self.tx_pos = 0;
        self.tx_from_reader = 0;
    }

    /// Sending-key updates so far (tests).
    #[cfg(test)]
    fn tx_key_updates(&self) -> u32 {
        match &self.engine {
            Engine::Records(r) => r.tx_key_updates,
            Engine::Rustls(_) => 0,
        }
    }

    /// Which record layer the connection ended up with (tests).
    #[cfg(test)]
    fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Records(_) => "records",
            Engine::Rustls(_) => "rustls",
        }
    }

    /// Append `data`, encrypted, to `tx`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.engine {
            Engine::Records(r) => r.seal(data, &mut self.tx),
            Engine::Rustls(_) => self.with_write_traffic(|w, tx| encrypt_into(w, data, tx)),
        }
    }

    /// Append a close_notify alert to `tx`.
    fn queue_close_notify(&mut self) -> io::Result<()> {
        match &mut self.engine {
            Engine::Records(r) => r.close_notify(&mut self.tx),
            Engine::Rustls(_) => self.with_write_traffic(|w, tx| {
                let start = tx.len();
                tx.resize(start + 64, 0);
                let n = w
                    .queue_close_notify(tx.get_mut(start..).unwrap_or_default())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                tx.truncate(start + n);
                Ok(())
            }),
        }
    }

    /// (rustls engine) Let rustls run (with no new input) and hand out the write state,
    /// then call `f`.
    fn with_write_traffic(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        let Engine::Rustls(conn) = &mut self.engine else {
            return Ok(());
        };
        let mut rx = std::mem::take(&mut self.rx);
        let mut f = Some(f);
        let mut consumed = 0usize;
        let mut woke_reader = false;
        let r = loop {
            let rest = rx.get_mut(consumed..).unwrap_or_default();
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(rest);
            let step = match state {
                Err(e) => Err(tls_err(e)),
                Ok(ConnectionState::WriteTraffic(mut w)) => match f.take() {
                    Some(f) => f(&mut w, &mut self.tx).map(|()| true),
                    None => Ok(true),
                },
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    encode_into(&mut e, &mut self.tx, usize::MAX).map(|()| false)
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(false)
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    // Records the reader has not run through rustls yet: keep them for it.
                    let mut step = Ok(false);
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                self.plain.extend_from_slice(rec.payload);
                                woke_reader = true;
                            }
                            Err(e) => {
                                step = Err(tls_err(e));
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read_eof = true;
                    woke_reader = true;
                    Ok(false)
                }
                Ok(ConnectionState::Closed) => Err(io::ErrorKind::BrokenPipe.into()),
                Ok(other) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state: {other:?}"),
                )),
            };
            consumed = (consumed + discard).min(rx.len());
            match step {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        rx.drain(..consumed);
        self.rx = if rx.is_empty() { Vec::new() } else { rx };
        if woke_reader && let Some(w) = self.read_waker.take() {
            w.wake();
        }
        r
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(failed_err()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        if std::mem::take(&mut this.conn_has_data) {
            let p = this
                .process_rx(Some(&mut *buf))
                .and_then(|p| this.answer_key_update().map(|()| p))
                .map_err(|e| this.fail(e))?;
            this.read_eof |= p.eof;
        }
        loop {
            // Never return Pending once `buf` holds data: the caller would drop it.
            this.take_plain(buf);
            if buf.filled().len() > start || this.read_eof {
                return Poll::Ready(Ok(()));
            }
            // Not zeroed: 32 KiB of memset per read would cost more than the read.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            if Pin::new(&mut this.tcp).poll_read(cx, &mut rb)?.is_pending() {
                this.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = rb.filled().len();
            if n == 0 {
                // TCP EOF. Without close_notify this may be a truncation, which the DERP
                // framing above notices (a partial frame); treat it as end of stream.
                this.read_eof = true;
                return Poll::Ready(Ok(()));
            }
            let r = if this.rx.is_empty() {
                // The common case: whole records in one read, processed on the stack; a
                // trailing partial record is kept on the heap.
                let data = rb.filled_mut();
                let (before, limit) = this.reader_tx_room();
                let mut sink = Sink {
                    out: Some(buf),
                    plain: &mut this.plain,
                };
                let r = process_engine(&mut this.engine, data, &mut sink, &mut this.tx, limit);
                this.reader_added(before);
                if let Ok(p) = &r
                    && let Some(left) = data.get(p.consumed..)
                    && !left.is_empty()
                {
                    this.rx.extend_from_slice(left);
                }
                r
            } else {
                this.rx.extend_from_slice(rb.filled());
                this.process_rx(Some(buf))
            };
            let p = r
                .and_then(|p| this.answer_key_update().map(|()| p))
                .map_err(|e| this.fail(e))?;
            if p.eof {
                this.read_eof = true;
            }
            if buf.filled().len() > start || p.eof {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The metric label (`disconnect_reasons`, `handshake_failures`) for an error with which
/// our TLS 1.3 record layer ended a connection: `tls_key_update_limit`,
/// `tls_record_overflow`, `tls_send_buffer_limit`, `tls_bad_record_mac`, `tls_peer_alert`
/// or `tls_protocol_error`. `None` for any other error.
pub(crate) fn error_reason(e: &io::Error) -> Option<&'static str> {
    records::RecordError::find(e).map(records::RecordError::reason)
}

/// The error every read and write gets after a fatal TLS error.
fn failed_err() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "TLS connection ended by an earlier error",
    )
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one batch of ciphertext is held: finish the last one first.
        ready!(this.poll_flush_tx(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.failed {
            return Poll::Ready(Err(failed_err()));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.encrypt(data)?;
        // Start sending now; whatever the socket does not take waits for the next call.
        match this.poll_flush_tx(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(data.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_tx(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued && !this.failed {
            ready!(this.poll_flush_tx(cx))?;
            this.close_queued = true;
            // A failure here (connection already broken) still shuts the socket down.
            let _ = this.queue_close_notify();
        }
        ready!(this.poll_flush_tx(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

pub(crate) mod records;

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests;
