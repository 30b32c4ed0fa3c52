//! A minimal kubelet API on each node IP: `/containerLogs` only, for `kubectl logs` (current or
//! `--previous` run, `--tail`, `-f`), over TLS with a self-signed certificate.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::spec::NodeSpec;
use super::{LOG_HEADER, Shared, lock, log_path};

/// Binds the node's kubelet endpoint and starts serving it; returns the port (0: none).
pub(super) async fn start_kubelet_server(shared: &Arc<Shared>, node: &NodeSpec) -> u16 {
    let port = shared.config.kubelet_port;
    if port == 0 {
        return 0;
    }
    let listener = match tokio::net::TcpListener::bind((node.ipv4, port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(node = %node.name, ip = %node.ipv4, port, error = %e,
                "cannot bind the kubelet endpoint; kubectl logs will not work for this node");
            return 0;
        }
    };
    let acceptor = match kubelet_tls(node.ipv4) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(node = %node.name, error = %format!("{e:#}"), "kubelet TLS setup");
            return 0;
        }
    };
    let s = shared.clone();
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = s.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let (s, acceptor) = (s.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = serve_kubelet_request(&s, tls).await;
                }
            });
        }
    });
    lock(&shared.kubelet_servers).insert(node.name.clone(), task);
    port
}

fn kubelet_tls(ip: Ipv4Addr) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![ip.to_string()])?.self_signed(&key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// One request per connection: `GET /containerLogs/<ns>/<pod>/<container>?follow=&previous=
/// &tailLines=`; anything else is 404.
async fn serve_kubelet_request<S>(shared: &Shared, stream: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncBufReadExt as _;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = tokio::io::BufReader::new(rd);
    let mut request = String::new();
    reader.read_line(&mut request).await?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [_, ns, pod, container] = segments.as_slice() else {
        return respond(
            &mut wr,
            404,
            "the kubederp node agent serves only /containerLogs\n",
        )
        .await;
    };
    if segments.first() != Some(&"containerLogs") {
        return respond(
            &mut wr,
            404,
            "the kubederp node agent serves only /containerLogs\n",
        )
        .await;
    }
    let file = log_path(&shared.config.workdir, ns, pod, container);
    let Ok(text) = tokio::fs::read(&file).await else {
        let msg = format!("no logs for container {container:?} of pod {ns}/{pod} on this agent\n");
        return respond(&mut wr, 404, &msg).await;
    };
    let mut offset = text.len();
    let text = String::from_utf8_lossy(&text);
    let previous = param("previous").as_deref() == Some("true");
    let follow = param("follow").as_deref() == Some("true") && !previous;
    let tail = param("tailLines").and_then(|t| t.parse::<usize>().ok());
    let runs: Vec<&str> = text.split(LOG_HEADER).collect();
    let run = if previous {
        runs.len().checked_sub(2).and_then(|i| runs.get(i))
    } else {
        runs.last()
    };
    // Drop the rest of the header line itself.
    let body = run
        .map(|r| r.split_once('\n').map_or("", |(_, rest)| rest))
        .unwrap_or_default();
    let lines: Vec<&str> = body.lines().collect();
    let from = tail.map_or(0, |t| lines.len().saturating_sub(t));
    let mut out = lines.get(from..).unwrap_or_default().join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    wr.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    write_chunk(&mut wr, out.as_bytes()).await?;
    if follow {
        loop {
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let Ok(all) = tokio::fs::read(&file).await else {
                break;
            };
            if all.len() <= offset {
                continue;
            }
            let new = String::from_utf8_lossy(all.get(offset..).unwrap_or_default()).into_owned();
            offset = all.len();
            let new: String = new
                .split_inclusive('\n')
                .filter(|l| !l.starts_with(LOG_HEADER))
                .collect();
            write_chunk(&mut wr, new.as_bytes()).await?;
        }
    }
    wr.write_all(b"0\r\n\r\n").await?;
    wr.flush().await
}

async fn write_chunk<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    w.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await
}

async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    code: u16,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if code == 200 { "OK" } else { "Not Found" },
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body.as_bytes()).await?;
    w.flush().await
}
