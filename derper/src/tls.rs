//! (tls: in progress)
