//! Reading an HTTP/1.x request head by hand: finding its end in a buffer and parsing it.
//! A leaf shared by the server side ([`super`]) and the DERP client, which reads the
//! relay's response head the same way.

/// A parsed HTTP/1.x request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Index just past the `\r\n\r\n` ending the head, if present.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a request head (everything up to and including the blank line). Never panics.
pub fn parse_head(buf: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(buf).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let version = first.next()?;
    if !version.starts_with("HTTP/1.") || first.next().is_some() || method.is_empty() {
        return None;
    }
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            continue;
        }
        let (k, v) = l.split_once(':')?;
        if k.is_empty() || k.contains(' ') {
            return None;
        }
        headers.push((k.to_owned(), v.trim().to_owned()));
    }
    Some(RequestHead {
        method,
        target,
        headers,
    })
}
