//! The `derp-operator` binary.

fn main() {}
