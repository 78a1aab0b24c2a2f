//! Integration tests of the Ethereum bridge, against real anvil nodes.

mod anchor;
mod contracts;
mod relayer;
