//! Local forging of Tezos manager operations, in the binary encoding the current protocol
//! reads (unchanged for manager operations since Seoul added the optional reveal proof):
//! an operation group is `branch (32 bytes) || contents...`, each content a `reveal` (tag 107)
//! or a `transaction` (tag 108); the signature is Ed25519 over
//! blake2b-256(`0x03` || forged bytes), the signed operation is forged bytes || signature, and
//! its hash is blake2b-256 of the signed bytes, base58check-encoded with the `o` prefix.
//!
//! Also the Micheline value of a call's parameter, in binary and JSON, and a decoder of what
//! this module forges (the stand-in Octez node and the tests read injected bytes with it).
//! Base58check, blake2b and the signed zarith (`Z`) come from `tezos_crypto_rs` and
//! `tezos_data_encoding`; the unsigned zarith (`N`) writer is ours (see [`put_n`]).
//!
//! The parts: `binary` (the zarith numbers and length-prefixed fields everything is built of),
//! `micheline` (parameter values), `content` (reveals and transactions), `group` (groups,
//! signatures and hashes) and `decode` (the bounds-checked reader that unforges all of them).

mod binary;
mod content;
mod decode;
mod group;
mod micheline;

use serde_json::Value;

pub use self::binary::{put_n, put_z};
pub use self::content::{Content, ManagerFields, Parameters};
pub use self::group::{OperationGroup, SignedOperation, operation_hash, signing_payload};
pub use self::micheline::Micheline;

/// Tag of a `reveal` content.
pub const TAG_REVEAL: u8 = 107;
/// Tag of a `transaction` content.
pub const TAG_TRANSACTION: u8 = 108;
/// Watermark of a signed manager operation ("generic operation").
pub const WATERMARK_GENERIC: u8 = 0x03;

/// The first characters of a JSON value, for error messages.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}
