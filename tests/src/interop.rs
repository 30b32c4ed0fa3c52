//! Go interop programs (in progress).
