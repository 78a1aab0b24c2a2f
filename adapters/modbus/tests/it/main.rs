//! Integration tests of the Modbus adapter: the adapter polls a real, independent Modbus server
//! (pymodbus, `tests/peers/modbus_sim.py`) over TCP and over RTU on a socat pseudo-terminal
//! pair, and writes through the real ingest into a chain on a fresh SQLite file per test.

mod support;

mod authorization;
mod isolation;
mod rtu;
mod setpoint;
mod tcp;
