//! End-to-end tests: real `kalima` processes, and real peers (the `sqlite3` CLI,
//! schemathesis, PostgreSQL), driven from outside through the CLI, the REST API and the
//! files of the data directory. Each test has its own temp directory, ports and database,
//! so they run in parallel.

#![allow(unreachable_pub)]

mod bridge;
mod cluster;
mod conformance;
mod demo;
mod durability;
mod keys;
mod lorawan;
mod market;
mod modbus;
mod mqtt;
mod mqtt_external;
mod postgres;
mod shutdown;
mod startup;
mod tamper;
