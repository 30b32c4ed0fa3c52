//! The `derper` binary.

fn main() {}
