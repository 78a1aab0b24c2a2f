//! Integration tests of the LoRaWAN adapter: test gateways speak the Semtech UDP packet-forwarder
//! protocol to the running adapter, every LoRaWAN frame is built and every join accept opened by
//! an independent implementation (lora-packet, `tests/peers/lora_frames.js`), and uplinks go
//! through the real ingest into a chain on a fresh SQLite file per test.

mod support;

mod codecs;
mod counters;
mod dedup;
mod downlinks;
mod gateways;
mod identity;
mod known_vector;
mod otaa;
mod restart;
