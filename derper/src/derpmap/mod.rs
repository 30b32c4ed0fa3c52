//! The derpMap model: `tailcfg.DERPMap` / `DERPRegion` / `DERPNode` with tailcfg's exact
//! JSON names (spec §9), its parser for the three published formats ([`parse_map`]) and its
//! byte-deterministic renderings ([`render_json`], [`render_policy`], [`render_headscale`]).
//!
//! One model for both sides: the operator builds and renders it (the derpMap ConfigMap),
//! the probe parses and dials it (`derper::probe`, the `derpprobe` binary). Ports are `i32`
//! as in tailcfg (Go `int`) and the CRD, with tailcfg's sentinels (`0` = default, `-1` = no
//! STUN); [`DerpNode::derp_port_to_dial`] and [`DerpNode::stun_port_to_probe`] turn them
//! into socket ports.
//!
//! Does not own: reading files, URLs or ConfigMaps (callers pass text), probing (`probe`),
//! or deciding which nodes a region publishes (the operator's planner).

mod model;
mod parse;
mod render;
#[cfg(test)]
mod tests;

pub use model::{DerpMap, DerpNode, DerpRegion, NoStunPort};
pub use parse::{MapError, MapFormat, parse_map, standardize_hujson};
pub use render::{content_hash, render_headscale, render_json, render_policy};
