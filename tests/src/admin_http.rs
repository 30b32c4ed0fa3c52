//! Plain HTTP to the admin listeners of the processes under test (`/metrics`, `/readyz`,
//! `/derpmap.json` of `derp-operator` and `derper`), on loopback.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, ToSocketAddrs};

/// `GET path` over HTTP/1.0 (so the body is never chunked and ends with the connection):
/// the status code and the body. Errors when nothing answers, or answers no HTTP, within 5 s.
pub async fn get(addr: impl ToSocketAddrs, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.context("connect")?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .context("send request")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.context("read response")?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within 5 s"))??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: not an HTTP response: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line: {head:?}"))?;
    Ok((status, body.to_owned()))
}
