//! Bindings to the `KlxToken` and `KlxBridge` contracts, generated from the artifacts that
//! `contracts/build.js` commits under `contracts/out/`, and the off-chain half of a release:
//! the EIP-712 digest the relayers sign, signing it, checking a signature exactly as the
//! contract will, and ordering signatures the way `release` requires.

use alloy::primitives::{Address, B256, Bytes, Signature, SignatureError, U256, uint};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolStruct, eip712_domain};

mod bindings {
    // The generated deploy helpers take the provider plus every constructor argument, which
    // is as many arguments as the contract's constructor has; that is not ours to shorten.
    #![allow(clippy::too_many_arguments)]

    alloy::sol!(
        #[sol(rpc, all_derives)]
        KlxBridge,
        "contracts/out/KlxBridge.json"
    );

    alloy::sol!(
        #[sol(rpc, all_derives)]
        KlxToken,
        "contracts/out/KlxToken.json"
    );

    alloy::sol!(
        #[sol(rpc, all_derives)]
        KlxAnchor,
        "contracts/out/KlxAnchor.json"
    );
}

/// Bindings of the bridge, the test token and the checkpoint anchor, with their bytecode.
pub use bindings::{KlxAnchor, KlxBridge, KlxToken};

sol! {
    /// The typed message relayers sign to authorise a release; it must stay identical to
    /// `RELEASE_TYPEHASH` in `KlxBridge.sol`, which the on-chain digest test pins.
    #[derive(Debug, PartialEq, Eq)]
    struct Release {
        address token;
        address recipient;
        uint256 amount;
        bytes32 withdrawalId;
        uint256 expiry;
    }
}

/// The EIP-712 domain name of `KlxBridge`.
pub const DOMAIN_NAME: &str = "KlxBridge";
/// The EIP-712 domain version of `KlxBridge`.
pub const DOMAIN_VERSION: &str = "1";

/// Half the secp256k1 group order; the contract (through OpenZeppelin's ECDSA) rejects any
/// `s` above it so that a signature has exactly one valid encoding.
const SECP256K1_HALF_ORDER: U256 = uint!(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0_U256);

/// Errors from signing or checking release signatures.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The signer failed to sign.
    #[error("signing the release failed")]
    Sign(#[from] alloy::signers::Error),
    /// The signature does not recover to any key.
    #[error("invalid signature")]
    Signature(#[from] SignatureError),
    /// The signature is well-formed secp256k1 but the contract would refuse its encoding.
    #[error("signature rejected by the bridge's rules: {0}")]
    Rejected(&'static str),
}

/// Result alias for this module.
pub type Result<T, E = ContractError> = std::result::Result<T, E>;

/// The EIP-712 digest `KlxBridge.releaseDigest` computes for a release on `bridge` at
/// `chain_id` paying `token`.
pub fn release_digest(
    chain_id: u64,
    bridge: Address,
    token: Address,
    recipient: Address,
    amount: U256,
    withdrawal_id: B256,
    expiry: U256,
) -> B256 {
    let domain = eip712_domain! {
        name: DOMAIN_NAME,
        version: DOMAIN_VERSION,
        chain_id: chain_id,
        verifying_contract: bridge,
    };
    Release { token, recipient, amount, withdrawalId: withdrawal_id, expiry }.eip712_signing_hash(&domain)
}

/// Signs a release digest, returning the 65-byte `r || s || v` encoding `release` takes.
pub fn sign_release(signer: &PrivateKeySigner, digest: &B256) -> Result<Bytes> {
    let signature = signer.sign_hash_sync(digest)?;
    Ok(Bytes::copy_from_slice(&signature.as_bytes()))
}

/// Recovers the address that signed `digest`, refusing exactly the encodings the contract
/// refuses (length other than 65, `v` other than 27 or 28, `s` in the upper half), so a
/// signature that passes here is not rejected on chain for its form.
pub fn recover_signer(digest: &B256, signature: &[u8]) -> Result<Address> {
    let [body @ .., v] = signature else {
        return Err(ContractError::Rejected("empty signature"));
    };
    if body.len() != 64 {
        return Err(ContractError::Rejected("length is not 65 bytes"));
    }
    if *v != 27 && *v != 28 {
        return Err(ContractError::Rejected("v is neither 27 nor 28"));
    }
    let parsed = Signature::from_raw(signature)?;
    if parsed.s() > SECP256K1_HALF_ORDER {
        return Err(ContractError::Rejected("s is in the upper half of the curve order"));
    }
    Ok(parsed.recover_address_from_prehash(digest)?)
}

/// Orders signatures by signer address, ascending, keeping the first one per signer: the
/// form `release` accepts, since it requires strictly increasing signers.
pub fn sort_signatures(signatures: impl IntoIterator<Item = (Address, Bytes)>) -> Vec<Bytes> {
    let mut pairs: Vec<(Address, Bytes)> = signatures.into_iter().collect();
    // A stable sort keeps the first signature of a duplicated signer in front for dedup.
    pairs.sort_by_key(|(signer, _)| *signer);
    pairs.dedup_by_key(|(signer, _)| *signer);
    pairs.into_iter().map(|(_, signature)| signature).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{address, b256};

    fn key(byte: u8) -> PrivateKeySigner {
        PrivateKeySigner::from_bytes(&B256::repeat_byte(byte)).expect("valid test key")
    }

    fn digest() -> B256 {
        release_digest(
            1,
            address!("0x1000000000000000000000000000000000000001"),
            address!("0x2000000000000000000000000000000000000002"),
            address!("0x3000000000000000000000000000000000000003"),
            U256::from(5u64),
            b256!("0x4000000000000000000000000000000000000000000000000000000000000004"),
            U256::from(6u64),
        )
    }

    #[test]
    fn typehash_matches_the_contract() {
        // The literal is the string hashed by RELEASE_TYPEHASH in KlxBridge.sol.
        assert_eq!(
            Release::eip712_encode_type(),
            "Release(address token,address recipient,uint256 amount,bytes32 withdrawalId,uint256 expiry)"
        );
    }

    #[test]
    fn digest_binds_every_field() {
        let base = digest();
        let other_chain = release_digest(
            2,
            address!("0x1000000000000000000000000000000000000001"),
            address!("0x2000000000000000000000000000000000000002"),
            address!("0x3000000000000000000000000000000000000003"),
            U256::from(5u64),
            b256!("0x4000000000000000000000000000000000000000000000000000000000000004"),
            U256::from(6u64),
        );
        let other_amount = release_digest(
            1,
            address!("0x1000000000000000000000000000000000000001"),
            address!("0x2000000000000000000000000000000000000002"),
            address!("0x3000000000000000000000000000000000000003"),
            U256::from(7u64),
            b256!("0x4000000000000000000000000000000000000000000000000000000000000004"),
            U256::from(6u64),
        );
        assert_ne!(base, other_chain);
        assert_ne!(base, other_amount);
    }

    #[test]
    fn signature_round_trips() {
        let signer = key(7);
        let signature = sign_release(&signer, &digest()).expect("sign");
        assert_eq!(signature.len(), 65);
        assert!(matches!(signature[64], 27 | 28));
        assert_eq!(recover_signer(&digest(), &signature).expect("recover"), signer.address());
    }

    #[test]
    fn recover_rejects_what_the_contract_rejects() {
        let signature = sign_release(&key(7), &digest()).expect("sign");

        let mut high_s = signature.to_vec();
        let s = U256::from_be_slice(&high_s[32..64]);
        let order = SECP256K1_HALF_ORDER * U256::from(2u8) + U256::from(1u8);
        high_s[32..64].copy_from_slice(&(order - s).to_be_bytes::<32>());
        high_s[64] = if high_s[64] == 27 { 28 } else { 27 };
        // The flipped form is a valid secp256k1 signature by the same key...
        let flipped = Signature::from_raw(&high_s).expect("parse");
        assert_eq!(flipped.recover_address_from_prehash(&digest()).expect("recover"), key(7).address());
        // ...which the bridge refuses as malleable.
        assert!(matches!(recover_signer(&digest(), &high_s), Err(ContractError::Rejected(_))));

        let mut bad_v = signature.to_vec();
        bad_v[64] = 1;
        assert!(matches!(recover_signer(&digest(), &bad_v), Err(ContractError::Rejected(_))));
        assert!(matches!(recover_signer(&digest(), &signature[..64]), Err(ContractError::Rejected(_))));
        assert!(matches!(recover_signer(&digest(), &[]), Err(ContractError::Rejected(_))));
    }

    #[test]
    fn sort_orders_by_signer_and_drops_duplicates() {
        let a = address!("0x0000000000000000000000000000000000000001");
        let b = address!("0x0000000000000000000000000000000000000002");
        let c = address!("0x0000000000000000000000000000000000000003");
        let sorted = sort_signatures([
            (c, Bytes::from_static(b"c")),
            (a, Bytes::from_static(b"a1")),
            (b, Bytes::from_static(b"b")),
            (a, Bytes::from_static(b"a2")),
        ]);
        assert_eq!(sorted, vec![Bytes::from_static(b"a1"), Bytes::from_static(b"b"), Bytes::from_static(b"c")]);
    }
}
