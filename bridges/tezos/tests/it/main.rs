//! Integration tests of the Tezos bridge: forging and signing checked against pytezos, the
//! anchoring contract run in pytezos's Michelson interpreter, and the anchorer and
//! `read_anchor` against a stand-in Octez node answering with recorded response shapes.

mod contract;
mod forge_pytezos;
mod octez;
mod read;
mod support;
