//! Integration tests of the Ethereum bridge, against real anvil nodes.

mod contracts;
mod relayer;
