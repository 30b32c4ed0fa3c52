//! The published derpMap: the operator uses the relay crate's model ([`derper::derpmap`]:
//! `tailcfg.DERPMap` types with tailcfg's JSON names, spec §9, and the byte-deterministic
//! `derpmap.json` / `policy.hujson` / `headscale.yaml` renderings plus their content hash),
//! so what the operator publishes and what `derpprobe` reads are one model.

pub use derper::derpmap::{
    DerpMap, DerpNode, DerpRegion, content_hash, render_headscale, render_json, render_policy,
};
