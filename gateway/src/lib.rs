//! The `kalima` node: CLI, configuration, REST/OpenAPI server and live streams, wired over
//! the chain core.

pub mod api;
pub mod bench;
pub mod bench_cluster;
pub mod bench_klx;
pub mod bench_lorawan;
pub mod bench_market;
pub mod bench_modbus;
pub mod bench_mqtt;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod klx_cli;
pub mod market_cli;
pub mod node;
pub mod receipt_cli;
