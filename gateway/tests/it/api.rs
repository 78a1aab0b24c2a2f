//! The `/api/v1` surface as a client sees it: writes and their receipts, every rejection of
//! the write path, grants on every interface (REST, SSE, WebSocket), the device admin API,
//! proofs checked with an independent RFC 6962 verifier, paging, live streams and the
//! operations endpoints.
//!
//! Rejection counters are read from the process-global Prometheus recorder as before/after
//! deltas of one exact series; nextest runs each test in its own process, so no other test
//! moves them.

mod common;
mod devices;
mod grants;
mod ops;
mod paging;
mod proofs;
mod rejections;
mod streams;
mod writes;
