//! (certs: in progress)
