//! The outcome of one probe of one relay node: [`summarize`] turns a `derper::probe` region
//! report into one [`Outcome`] per node (`ok`, or the first failed check and why), the value
//! both the health state machine ([`crate::health`]) and the metrics ([`crate::metrics`])
//! consume. PURE, and a leaf: it imports nothing else from this crate.
//!
//! A failed mesh check blames both ends only when both nodes pass their own checks (a node
//! that is down already explains every mesh failure it is part of).

use std::collections::BTreeMap;
use std::time::Duration;

use derper::probe::{RegionReport, Status};

/// Longest probe result kept in the status (the rest of a long message is cut).
pub const MAX_RESULT_LEN: usize = 300;

/// One probe of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Short name of the first failed check (`tcp`, `tls`, `pin`, `derp`, `round_trip`,
    /// `stun`, `ipv6_<check>`, `mesh`), or `ok`: a bounded metrics label.
    pub check: &'static str,
    /// `ok`, or `<check>: <why>`.
    pub result: String,
    /// Packet round trip through the relay, when measured.
    pub latency: Option<Duration>,
}

impl Outcome {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.check == "ok"
    }
}

fn cut(s: String) -> String {
    if s.len() <= MAX_RESULT_LEN {
        return s;
    }
    let mut end = MAX_RESULT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn ipv6_name(check: &str) -> &'static str {
    match check {
        "tcp" => "ipv6_tcp",
        "tls" => "ipv6_tls",
        "derp" => "ipv6_derp",
        "stun" => "ipv6_stun",
        _ => "ipv6",
    }
}

fn main_name(check: &str) -> &'static str {
    match check {
        "tcp" => "tcp",
        "tls" => "tls",
        "derp" => "derp",
        "round_trip" => "round_trip",
        "stun" => "stun",
        _ => "other",
    }
}

/// One [`Outcome`] per node of a probe report, keyed by node name.
pub fn summarize(report: &RegionReport) -> BTreeMap<String, Outcome> {
    let mut out = BTreeMap::new();
    for n in &report.nodes {
        let own = n
            .checks
            .iter()
            .into_iter()
            .find(|(_, c)| c.status == Status::Fail)
            .map(|(name, c)| {
                let pin_mismatch = name == "tls"
                    && n.tls.as_ref().is_some_and(|t| {
                        t.expected_pin.is_some()
                            && t.presented_pin.is_some()
                            && t.expected_pin != t.presented_pin
                    });
                let check = if pin_mismatch { "pin" } else { main_name(name) };
                (check, format!("{check}: {}", c.message))
            })
            .or_else(|| {
                n.ipv6.as_ref().and_then(|f| {
                    f.iter()
                        .into_iter()
                        .find(|(_, c)| c.status == Status::Fail)
                        .map(|(name, c)| {
                            let check = ipv6_name(name);
                            (check, format!("{check} ({}): {}", f.address, c.message))
                        })
                })
            });
        let outcome = match own {
            Some((check, result)) => Outcome {
                check,
                result: cut(result),
                latency: None,
            },
            None => Outcome {
                check: "ok",
                result: "ok".to_owned(),
                latency: n
                    .checks
                    .round_trip
                    .latency_ms
                    .filter(|ms| ms.is_finite() && *ms >= 0.0)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            },
        };
        out.insert(n.name.clone(), outcome);
    }
    // mesh: only between nodes whose own checks pass (see the module docs); a node keeps
    // the first mesh failure it is part of
    let own_ok: Vec<String> = out
        .iter()
        .filter(|(_, o)| o.ok())
        .map(|(n, _)| n.clone())
        .collect();
    for m in &report.mesh {
        if m.check.status != Status::Fail || !own_ok.contains(&m.from) || !own_ok.contains(&m.to) {
            continue;
        }
        for (me, peer, dir) in [(&m.from, &m.to, "to"), (&m.to, &m.from, "from")] {
            if let Some(o) = out.get_mut(me.as_str())
                && o.ok()
            {
                *o = Outcome {
                    check: "mesh",
                    result: cut(format!(
                        "mesh: a packet {dir} a client on mesh peer {peer} was not relayed ({})",
                        m.check.message
                    )),
                    latency: None,
                };
            }
        }
    }
    out
}
