//! `derp-operator`: reconciles `DerpRegion` objects into relays and a published derpMap.
