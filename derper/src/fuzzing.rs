//! Entry points for the coverage-guided fuzz targets in `derper/fuzz/` (feature `fuzzing`).
//!
//! Only decoders that are not public already are reached through here, as thin wrappers
//! that call the production code unchanged. Not a stable API: nothing outside the fuzz
//! crate should use it.

use std::io;
use std::ops::Range;

use crate::http::{HttpOptions, ListenerKind, RequestHead, Upgrade, classify};

/// How the relay treats the first request head of a connection (the hand-written
/// classifier in [`crate::http`]); `None` = replayed into the HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadClass {
    /// A DERP upgrade answered with 101, or without any response in fast-start mode.
    Derp {
        /// `Derp-Fast-Start: 1` was sent.
        fast_start: bool,
    },
    /// DERP over WebSocket.
    WebSocket {
        /// The `Sec-WebSocket-Accept` value the relay answers with.
        accept: String,
    },
}

/// Classifies a parsed head as the relay does on `kind` with `/derp` enabled or not.
pub fn classify_head(
    head: &RequestHead,
    derp_enabled: bool,
    kind: ListenerKind,
) -> Option<HeadClass> {
    let http = HttpOptions {
        derp_enabled,
        ..HttpOptions::default()
    };
    classify(head, &http, kind).map(|u| match u {
        Upgrade::Derp { fast_start } => HeadClass::Derp { fast_start },
        Upgrade::WebSocket { accept } => HeadClass::WebSocket { accept },
    })
}

/// One TLS 1.3 record opened by [`RecordKeys::open_one`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedRecord {
    /// Bytes the record took in the input (header included).
    pub len: usize,
    /// Inner content type.
    pub typ: u8,
    /// Where the decrypted content sits in the input.
    pub content: Range<usize>,
}

/// The TLS 1.3 record protection of the relay's server stream (`tls_stream::records`).
pub struct RecordKeys(crate::tls_stream::records::RecordKeys);

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKeys")
    }
}

impl RecordKeys {
    /// Keys and sequence numbers as rustls extracts them.
    pub fn new(secrets: rustls::ExtractedSecrets) -> io::Result<Self> {
        crate::tls_stream::records::RecordKeys::new(secrets).map(Self)
    }

    /// Opens the record at the start of `data` in place; `None` if it is not complete.
    pub fn open_one(&mut self, data: &mut [u8]) -> io::Result<Option<OpenedRecord>> {
        Ok(self.0.open_one(data)?.map(|r| OpenedRecord {
            len: r.len,
            typ: r.typ,
            content: r.content,
        }))
    }

    /// Appends one sealed record of inner type `typ` holding `content` to `tx`.
    pub fn seal_record(&mut self, typ: u8, content: &[u8], tx: &mut Vec<u8>) -> io::Result<()> {
        self.0.seal_record(typ, content, tx)
    }
}
