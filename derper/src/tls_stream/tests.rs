//! [`TlsServerStream`] against rustls' own buffered client (via tokio-rustls): both TLS
//! versions, large and tiny writes, records split across reads, KeyUpdate, close_notify,
//! and garbage instead of a ClientHello.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn server_config() -> Arc<ServerConfig> {
    let (cert, key) = crate::testing::self_signed_for("127.0.0.1".parse().expect("ip"));
    crate::testing::server_tls_config(cert, key)
}

fn client(version: &'static rustls::SupportedProtocolVersion) -> tokio_rustls::TlsConnector {
    let c =
        crate::bench::insecure_client_config(rustls::crypto::ring::default_provider(), &[version]);
    tokio_rustls::TlsConnector::from(Arc::new(c))
}

/// A tokio-rustls client connection to `addr` with only `version` enabled.
async fn connect(
    addr: SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    client(version).connect(name, tcp).await.expect("handshake")
}

/// A server that accepts one connection with [`accept`] and echoes it until EOF, then
/// shuts down (close_notify). Returns the address and the server task.
async fn echo_once(read_size: usize) -> (SocketAddr, tokio::task::JoinHandle<io::Result<u64>>) {
    echo_once_with(read_size, |_| {}).await
}

/// [`echo_once`] with a hook that sees the stream right after the handshake.
async fn echo_once_with(
    read_size: usize,
    hook: impl FnOnce(&mut TlsServerStream) + Send + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<io::Result<u64>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let cfg = server_config();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await?;
        let mut s = accept(cfg, tcp).await?;
        hook(&mut s);
        let (mut r, mut w) = tokio::io::split(s);
        let mut buf = vec![0u8; read_size];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            w.write_all(&buf[..n]).await?;
        }
        w.shutdown().await?;
        Ok(total)
    });
    (addr, task)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 7 + i / 251) % 256).unwrap_or(0))
        .collect()
}

async fn echo_round_trip(version: &'static rustls::SupportedProtocolVersion, read_size: usize) {
    // TLS 1.3 runs on our own record layer, TLS 1.2 stays with rustls.
    let want = if version.version == ProtocolVersion::TLSv1_3 {
        "records"
    } else {
        "rustls"
    };
    let (addr, server) =
        echo_once_with(read_size, move |s| assert_eq!(s.engine_name(), want)).await;
    let tls = connect(addr, version).await;
    assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
    let (mut r, mut w) = tokio::io::split(tls);
    // One byte, a few small writes, then 200 KiB (many full records).
    let sizes = [1usize, 3, 100, 1400, 200 * 1024];
    let total: usize = sizes.iter().sum();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map(|_| got)
    });
    let mut sent = Vec::new();
    for n in sizes {
        let p = pattern(n);
        w.write_all(&p).await.expect("write");
        w.flush().await.expect("flush");
        sent.extend_from_slice(&p);
    }
    w.shutdown().await.expect("client close_notify");
    // read_to_end fails with UnexpectedEof unless the server sent close_notify.
    let got = reader
        .await
        .expect("join")
        .expect("echo ends with close_notify");
    assert_eq!(got.len(), total);
    assert!(got == sent, "echoed bytes differ");
    assert_eq!(server.await.expect("join").expect("server"), total as u64);
}

#[tokio::test]
async fn echoes_over_tls13_and_tls12() {
    echo_round_trip(&rustls::version::TLS13, 64 * 1024).await;
    echo_round_trip(&rustls::version::TLS12, 64 * 1024).await;
}

#[tokio::test]
async fn small_reader_buffers_keep_the_rest_of_a_record() {
    // A 7-byte read buffer: every record is handed out over many reads.
    echo_round_trip(&rustls::version::TLS13, 7).await;
}

/// Forwards bytes between two sockets in `chunk`-byte writes, so records and handshake
/// messages arrive split at arbitrary points.
async fn dribble(mut a: TcpStream, mut b: TcpStream, chunk: usize) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = ar.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                let _ = bw.shutdown().await;
                return;
            }
            for part in buf[..n].chunks(chunk) {
                if bw.write_all(part).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
    };
    tokio::join!(up, down);
}

#[tokio::test]
async fn records_split_across_reads() {
    let (addr, server) = echo_once(64 * 1024).await;
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front_addr = front.local_addr().expect("addr");
    tokio::spawn(async move {
        let (a, _) = front.accept().await.expect("accept");
        let b = TcpStream::connect(addr).await.expect("connect");
        b.set_nodelay(true).expect("nodelay");
        dribble(a, b, 5).await;
    });
    let tcp = TcpStream::connect(front_addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = client(&rustls::version::TLS13)
        .connect(name, tcp)
        .await
        .expect("handshake through 5-byte pieces");
    let msg = pattern(5000);
    tls.write_all(&msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back).await.expect("echo");
    assert!(back == msg);
    tls.shutdown().await.expect("close");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.expect("clean end");
    assert!(rest.is_empty());
    assert_eq!(server.await.expect("join").expect("server"), 5000);
}

#[tokio::test]
async fn data_sent_with_the_client_finished_is_read() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (addr, server) = echo_once(64 * 1024).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        // Written before the handshake ends: rustls sends it right behind its Finished, so
        // the server's handshake reads both in one go.
        let mut tls = client(version)
            .connect_with(name, tcp, |c| {
                c.writer().write_all(b"early bird").expect("buffer");
            })
            .await
            .expect("handshake");
        let mut back = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut back))
            .await
            .expect("echo arrives")
            .expect("read");
        assert_eq!(&back, b"early bird");
        tls.shutdown().await.expect("close");
        assert_eq!(server.await.expect("join").expect("server"), 10);
    }
}

#[tokio::test]
async fn key_update_from_the_client_is_answered() {
    let (addr, server) = echo_once(64 * 1024).await;
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    for round in 0..3u8 {
        // KeyUpdate(update_requested): the server must switch its receive key and answer
        // with its own KeyUpdate before the echo, or the client cannot decrypt the echo.
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
        let msg = vec![round; 1000];
        tls.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back)
            .await
            .expect("echo after key update");
        assert_eq!(back, msg);
    }
    tls.shutdown().await.expect("close");
    assert_eq!(server.await.expect("join").expect("server"), 3000);
}

#[tokio::test]
async fn garbage_and_truncated_handshakes_fail_cleanly() {
    let cfg = server_config();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    for input in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
        Vec::new(),
    ] {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = l.accept().await.expect("accept");
        c.write_all(&input).await.expect("write");
        c.shutdown().await.expect("shutdown");
        let r = tokio::time::timeout(Duration::from_secs(5), accept(cfg.clone(), tcp))
            .await
            .expect("accept ends on its own");
        let e = r.expect_err("not a TLS client");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ),
            "{input:?}: {e}"
        );
    }
}

#[tokio::test]
async fn idle_stream_holds_no_buffers() {
    let (addr, _server) = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let cfg = server_config();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut s = accept(cfg, tcp).await.expect("handshake");
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(&buf[..n]).await.expect("write");
            s.flush().await.expect("flush");
            let _ = tx.send(s);
        });
        ((addr, rx), t)
    };
    let (addr, rx) = addr;
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    tls.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.expect("read");
    let s = rx.await.expect("server stream");
    assert_eq!(
        (s.rx.capacity(), s.plain.capacity(), s.tx.capacity()),
        (0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn sending_key_is_replaced_after_its_record_budget() {
    // Every 3 records the server sends KeyUpdate and switches keys; the client (rustls)
    // follows, or it could not read what comes after.
    let (addr, server) = echo_once_with(64 * 1024, |s| {
        if let Engine::Records(r) = &mut s.engine {
            r.set_tx_records_per_key(3);
        } else {
            panic!("TLS 1.3 should use the record layer");
        }
    })
    .await;
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    for i in 0..20u8 {
        let msg = vec![i; 100 + usize::from(i)];
        tls.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back)
            .await
            .expect("echo across key updates");
        assert_eq!(back, msg);
    }
    tls.shutdown().await.expect("close");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .await
        .expect("clean close_notify");
    server.await.expect("join").expect("server");
}

/// Handshake, then write `raw` straight onto the TCP stream (bypassing the client's TLS)
/// and return what the server's next read gives.
async fn server_read_after_raw(raw: Vec<u8>) -> io::Result<usize> {
    let (addr, server) = echo_once(1024).await;
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    tls.get_mut().0.write_all(&raw).await.expect("raw write");
    let r = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server ends on its own")
        .expect("join");
    r.map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

#[tokio::test]
async fn tampered_and_oversized_records_are_errors() {
    // An application-data record whose ciphertext is garbage: bad_record_mac.
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend(0..40u8);
    let e = server_read_after_raw(forged)
        .await
        .expect_err("forged record");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("decrypt"), "{e}");
    // A header declaring more than 2^14 + 256 bytes.
    let e = server_read_after_raw(vec![23, 3, 3, 0xff, 0xff])
        .await
        .expect_err("oversized");
    assert!(e.to_string().contains("out of range"), "{e}");
    // A plaintext handshake record after the handshake.
    let e = server_read_after_raw(vec![22, 3, 3, 0, 4, 1, 0, 0, 0])
        .await
        .expect_err("plaintext record");
    assert!(e.to_string().contains("unexpected TLS record type"), "{e}");
}

/// A server socket whose send buffer and a client socket whose receive buffer are as small
/// as the kernel allows, so bytes the client does not read back up into the server's own
/// send buffer instead of the kernel's.
fn small_buffer_pair() -> (TcpListener, SocketAddr, tokio::net::TcpSocket) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.set_send_buffer_size(4096).expect("SO_SNDBUF");
    s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let l = s.listen(8).expect("listen");
    let addr = l.local_addr().expect("addr");
    let c = tokio::net::TcpSocket::new_v4().expect("socket");
    c.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    (l, addr, c)
}

/// A server on `l` that says "go" once the handshake is done, then reads (and drops)
/// everything until EOF or an error. Returns how reading ended and the largest send
/// buffer the read side held on the way.
fn read_until_end(l: TcpListener) -> tokio::task::JoinHandle<(io::Result<()>, usize)> {
    let cfg = server_config();
    tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = accept(cfg, tcp).await.expect("handshake");
        // The client waits for this, so that what it sends meets our record layer and
        // not rustls still finishing the handshake.
        s.write_all(b"go").await.expect("write");
        s.flush().await.expect("flush");
        let mut buf = vec![0u8; 4096];
        let r = loop {
            match s.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        (r, s.tx_peak)
    })
}

/// Connect `c` to `addr` (TLS 1.3) and wait for the server's "go".
async fn connect_after_go(
    c: tokio::net::TcpSocket,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = c.connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = client(&rustls::version::TLS13)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut go = [0u8; 2];
    tls.read_exact(&mut go).await.expect("server ready");
    tls
}

#[tokio::test]
async fn key_update_requests_from_a_client_that_never_reads_do_not_grow_the_send_buffer() {
    // 10,000 × (KeyUpdate(update_requested), one byte of data): within the limit, since
    // data comes between, but the client reads nothing. Once the socket is full, one
    // reply waits in the send buffer and every later request is answered by it.
    let (l, addr, c) = small_buffer_pair();
    let server = read_until_end(l);
    let mut tls = connect_after_go(c, addr).await;
    for _ in 0..10_000 {
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
        tls.write_all(&[1]).await.expect("write");
    }
    tls.flush().await.expect("flush");
    tls.get_mut().0.shutdown().await.expect("shutdown");
    let (r, peak) = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("server ends on its own")
        .expect("join");
    assert!(peak <= 256, "the server's send buffer grew to {peak} bytes");
    r.expect("a well-formed stream, read to its end");
}

#[tokio::test]
async fn key_update_flood_is_cut_off_with_a_bounded_send_buffer() {
    // A client that asks for 10,000 KeyUpdates and never reads. Before the limit, every
    // request queued a reply in the server's send buffer: memory grew with the attacker's
    // bytes. Now the requests coalesce into one reply and the 33rd KeyUpdate without
    // application data in between ends the connection.
    let (l, addr, c) = small_buffer_pair();
    let server = read_until_end(l);
    let mut tls = connect_after_go(c, addr).await;
    for _ in 0..10_000 {
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
    }
    // The server hangs up part-way; the client's write may then fail.
    let _ = tls.flush().await;
    let _ = tls.get_mut().0.shutdown().await;
    let (r, peak) = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("server ends on its own")
        .expect("join");
    assert!(peak <= 256, "the server's send buffer grew to {peak} bytes");
    let e = r.expect_err("a KeyUpdate flood ends the connection");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("KeyUpdate"), "{e}");
}

#[tokio::test]
async fn key_update_requests_before_our_reply_are_coalesced() {
    // Five KeyUpdate(update_requested) and then data, in one flight: the server answers
    // with one KeyUpdate (RFC 8446 §4.6.3: a peer that was silent answers several requests
    // with one update), and rustls on the client still decrypts the echo.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let cfg = server_config();
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = accept(cfg, tcp).await.expect("handshake");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.expect("read");
        s.write_all(&buf[..n]).await.expect("write");
        s.flush().await.expect("flush");
        let updates = s.tx_key_updates();
        let n = s.read(&mut buf).await.expect("read");
        s.write_all(&buf[..n]).await.expect("write");
        s.flush().await.expect("flush");
        (updates, s.tx_key_updates())
    });
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    for _ in 0..5 {
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
    }
    tls.write_all(b"ping").await.expect("write");
    tls.flush().await.expect("flush");
    let mut back = [0u8; 4];
    tls.read_exact(&mut back)
        .await
        .expect("echo after one KeyUpdate");
    assert_eq!(&back, b"ping");
    // And once more, with data in between: a new request gets a new answer.
    tls.get_mut().1.refresh_traffic_keys().expect("key update");
    tls.write_all(b"pong").await.expect("write");
    tls.flush().await.expect("flush");
    tls.read_exact(&mut back)
        .await
        .expect("echo after the next KeyUpdate");
    assert_eq!(&back, b"pong");
    let (first, second) = server.await.expect("join");
    assert_eq!(
        (first, second),
        (1, 2),
        "sending-key updates after each flight"
    );
}

#[tokio::test]
async fn key_updates_both_ways_keep_working() {
    // A well-behaved peer: the client asks for an update before every message (80 in
    // all, more than the limit, but with data in between) while the server moves to a
    // new sending key every 2 records on its own.
    let (addr, server) = echo_once_with(64 * 1024, |s| {
        if let Engine::Records(r) = &mut s.engine {
            r.set_tx_records_per_key(2);
        } else {
            panic!("TLS 1.3 should use the record layer");
        }
    })
    .await;
    let mut tls = connect(addr, &rustls::version::TLS13).await;
    for i in 0..80u8 {
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
        if i % 2 == 0 {
            // An update the client did not ask for as well.
            tls.get_mut().1.refresh_traffic_keys().expect("key update");
        }
        let msg = vec![i; 50 + usize::from(i)];
        tls.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back)
            .await
            .expect("echo across key updates");
        assert_eq!(back, msg);
    }
    tls.shutdown().await.expect("close");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .await
        .expect("clean close_notify");
    server.await.expect("join").expect("server");
}

/// A TLS 1.3 client that seals its own records after the handshake, with the keys rustls
/// extracted: for records no TLS library would send.
async fn raw_record_client(addr: SocketAddr) -> (TcpStream, records::RecordKeys) {
    let mut c = crate::bench::insecure_client_config(
        rustls::crypto::ring::default_provider(),
        &[&rustls::version::TLS13],
    );
    c.enable_secret_extraction = true;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(c))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (tcp, conn) = tls.into_inner();
    #[allow(deprecated)]
    let secrets = conn.dangerous_extract_secrets().expect("secrets");
    (tcp, records::RecordKeys::new(secrets).expect("keys"))
}

/// The next record from the server other than a session ticket: (type, content), or
/// `None` at EOF.
async fn next_record(
    tcp: &mut TcpStream,
    keys: &mut records::RecordKeys,
    buf: &mut Vec<u8>,
) -> Option<(u8, Vec<u8>)> {
    loop {
        if let Some(rec) = keys.open_one(buf).expect("server record") {
            let content = buf[rec.content.clone()].to_vec();
            buf.drain(..rec.len);
            if rec.typ == records::CONTENT_HANDSHAKE && content.first() == Some(&4) {
                continue;
            }
            return Some((rec.typ, content));
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn padding_past_the_inner_plaintext_limit_is_record_overflow() {
    // RFC 8446 §5.4: content + type + padding ≤ 2^14 + 1. Legal padding is accepted.
    let (addr, server) = echo_once(64 * 1024).await;
    let (mut tcp, mut keys) = raw_record_client(addr).await;
    let mut inner = b"padded".to_vec();
    inner.push(records::CONTENT_APPLICATION_DATA);
    inner.resize(records::MAX_PLAINTEXT, 0);
    // `seal_record` appends the type byte: 0 here, the last byte of the padding.
    let mut out = Vec::new();
    keys.seal_record(0, &inner, &mut out).expect("seal");
    tcp.write_all(&out).await.expect("write");
    let mut buf = Vec::new();
    let echo = next_record(&mut tcp, &mut keys, &mut buf).await;
    assert_eq!(
        echo,
        Some((records::CONTENT_APPLICATION_DATA, b"padded".to_vec()))
    );
    // One byte of padding more: 2^14 + 2 bytes of inner plaintext, a ciphertext well
    // inside 2^14 + 256.
    inner.push(0);
    out.clear();
    keys.seal_record(0, &inner, &mut out).expect("seal");
    tcp.write_all(&out).await.expect("write");
    let reply = next_record(&mut tcp, &mut keys, &mut buf).await;
    assert_eq!(
        reply,
        Some((
            records::CONTENT_ALERT,
            vec![2, records::ALERT_RECORD_OVERFLOW]
        )),
        "fatal record_overflow alert"
    );
    let e = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server ends on its own")
        .expect("join")
        .expect_err("record_overflow");
    assert!(e.to_string().contains("record_overflow"), "{e}");
    // Content alone at the limit, one byte of padding past it.
    let (addr, server) = echo_once(64 * 1024).await;
    let (mut tcp, mut keys) = raw_record_client(addr).await;
    let mut inner = vec![7u8; records::MAX_PLAINTEXT];
    inner.extend([records::CONTENT_APPLICATION_DATA, 0]);
    out.clear();
    keys.seal_record(0, &inner, &mut out).expect("seal");
    tcp.write_all(&out).await.expect("write");
    let e = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server ends on its own")
        .expect("join")
        .expect_err("record_overflow");
    assert!(e.to_string().contains("record_overflow"), "{e}");
}

#[test]
fn rustls_output_past_the_read_side_limit_is_refused_without_growing_the_buffer() {
    // What rustls encodes while the read side runs it may not push the send buffer past
    // the room the read side has left; the error leaves the buffer as it was. (Here its
    // first flight, answering a real ClientHello, against 10 bytes of room.)
    let cfg = crate::bench::insecure_client_config(
        rustls::crypto::ring::default_provider(),
        &[&rustls::version::TLS13],
    );
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut client = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    let mut conn = UnbufferedServerConnection::new(server_config()).expect("server");
    let mut plain = Vec::new();
    let mut sink = Sink {
        out: None,
        plain: &mut plain,
    };
    let mut tx = b"queued".to_vec();
    let limit = tx.len() + 10;
    let e = process(&mut conn, &mut hello, &mut sink, &mut tx, limit).expect_err("over the limit");
    assert_eq!(error_reason(&e), Some("tls_send_buffer_limit"), "{e}");
    assert_eq!(tx, b"queued");
}
