//! Integration tests of the MQTT front door: an independent MQTT client (paho-mqtt,
//! `tests/peers/`) and hand-encoded bytes talk MQTT 3.1.1 and 5 to the real server, which
//! writes through the real ingest into a chain on a fresh SQLite file per test.

mod support;

mod deliveries;
mod malformed;
mod ordering;
mod puts;
mod refusals;
mod revocation;
