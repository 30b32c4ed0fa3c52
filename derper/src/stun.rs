//! (stun: in progress)
