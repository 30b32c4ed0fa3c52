//! Bounds on connections that have not been admitted yet: from `accept` through the TLS
//! handshake, the HTTP request head and the DERP handshake (ServerKey, ClientInfo,
//! admission). Such a connection has proved nothing, so their number is capped in total
//! and per source address (`--handshake-connection-limit`,
//! `--handshake-connection-limit-per-ip`); a connection over either cap is closed right
//! at accept and counted in `derper_handshake_limit_rejections{scope}`.
//!
//! A [`HandshakeSlot`] is taken at accept and released when the client is admitted (or the
//! connection ends first); connections that stay plain HTTP keep theirs until they close.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// The per-source key: an IPv4 address, or the /64 of an IPv6 address (one host usually
/// holds a whole /64, so counting single IPv6 addresses would bound nothing).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Why a connection was refused a slot (the metric's `scope` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The total cap.
    Total,
    /// The per-source cap.
    PerIp,
}

impl Refused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerIp => "per_ip",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// The shared counters behind the caps.
#[derive(Debug)]
pub(crate) struct HandshakeGate {
    /// Total cap (0 = none).
    max_total: usize,
    /// Per-source cap (0 = none).
    max_per_source: usize,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

impl HandshakeGate {
    pub(crate) fn new(max_total: usize, max_per_source: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            max_total,
            max_per_source,
            counts: Mutex::new(Counts::default()),
            metrics,
        }
    }

    /// Takes a slot for a connection from `ip`, or says which cap it is over (counted).
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
    ) -> Result<HandshakeSlot, Refused> {
        let source = ip.map(source_key);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let refused = if self.max_total > 0 && c.total >= self.max_total {
            Some(Refused::Total)
        } else if let Some(s) = source
            && self.max_per_source > 0
            && c.per_source.get(&s).copied().unwrap_or(0) >= self.max_per_source
        {
            Some(Refused::PerIp)
        } else {
            None
        };
        if let Some(r) = refused {
            drop(c);
            self.metrics.handshake_limit_rejection(r.as_str());
            return Err(r);
        }
        c.total += 1;
        if let Some(s) = source {
            *c.per_source.entry(s).or_insert(0) += 1;
        }
        drop(c);
        self.metrics.handshaking_connections.inc();
        Ok(HandshakeSlot {
            gate: self.clone(),
            source,
        })
    }
}

/// One connection's place under the caps; released on drop.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    gate: Arc<HandshakeGate>,
    source: Option<IpAddr>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self.gate.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(s) = self.source
            && let Some(n) = c.per_source.get_mut(&s)
        {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&s);
            }
        }
        drop(c);
        self.gate.metrics.handshaking_connections.dec();
    }
}

/// A connection's [`HandshakeSlot`] as it is handed along (to the DERP handshake, or to
/// the task of a connection upgraded by hyper): clones share it, and it is released when
/// [`release`](Self::release) is called or the last clone is dropped.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotHolder(Option<Arc<Mutex<Option<HandshakeSlot>>>>);

impl SlotHolder {
    pub(crate) fn new(slot: Option<HandshakeSlot>) -> Self {
        Self(slot.map(|s| Arc::new(Mutex::new(Some(s)))))
    }

    /// Releases the slot now (the client was admitted).
    pub(crate) fn release(&self) {
        if let Some(m) = &self.0 {
            let slot = m.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_release() {
        let g = Arc::new(HandshakeGate::new(3, 2, Metrics::unregistered()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        let s1 = g.try_acquire(Some(a)).unwrap();
        let s2 = g.try_acquire(Some(a)).unwrap();
        assert_eq!(g.try_acquire(Some(a)).err(), Some(Refused::PerIp));
        // Same /64.
        let s3 = g.try_acquire(Some(b)).unwrap();
        assert_eq!(g.try_acquire(Some(b2)).err(), Some(Refused::Total));
        drop(s1);
        let s4 = g.try_acquire(Some(b2)).unwrap();
        assert_eq!(g.try_acquire(Some(b)).err(), Some(Refused::Total));
        assert_eq!(g.metrics.handshaking_connections.get(), 3);
        drop((s2, s3, s4));
        assert_eq!(g.metrics.handshaking_connections.get(), 0);
        let c = g.counts.lock().unwrap();
        assert_eq!((c.total, c.per_source.len()), (0, 0));
    }

    #[test]
    fn zero_means_no_cap() {
        let g = Arc::new(HandshakeGate::new(0, 0, Metrics::unregistered()));
        let slots: Vec<_> = (0..100).filter_map(|_| g.try_acquire(None).ok()).collect();
        assert_eq!(slots.len(), 100);
    }
}
