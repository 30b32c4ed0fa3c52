//! Prints the `DerpRegion` CustomResourceDefinition as YAML.

fn main() {}
