//! Integration tests of the gateway: the HTTP application driven in-process (no socket)
//! over a real chain on a fresh SQLite file.

#![allow(unreachable_pub)]
mod support;

mod api;
mod compat;
