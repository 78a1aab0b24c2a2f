//! Operation groups (a branch and its contents) and signed operations: their binary and JSON
//! forms, the bytes a signature covers (the generic watermark), and operation hashes.

use serde_json::{Value, json};
use tezos_crypto_rs::blake2b;
use tezos_crypto_rs::hash::{BlockHash, Ed25519Signature, HashTrait, OperationHash};

use super::WATERMARK_GENERIC;
use super::content::Content;
use super::decode::Reader;
use crate::error::{Error, Result};

/// An operation group: a branch (a recent block) and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationGroup {
    /// The block the operation is anchored to (it is valid for a limited number of levels
    /// after it).
    pub branch: BlockHash,
    /// The contents, applied in order and all or nothing.
    pub contents: Vec<Content>,
}

impl OperationGroup {
    /// The unsigned binary form.
    pub fn forge(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.branch.as_ref());
        for c in &self.contents {
            c.forge_into(&mut out)?;
        }
        Ok(out)
    }

    /// The JSON form (`branch`, `contents`, and `signature` when given) the RPC takes.
    pub fn to_json(&self, signature: Option<&str>) -> Value {
        let mut o = json!({
            "branch": self.branch.to_b58check(),
            "contents": self.contents.iter().map(Content::to_json).collect::<Vec<_>>(),
        });
        if let Some(s) = signature {
            o["signature"] = json!(s);
        }
        o
    }

    /// Reads the JSON form (`branch`, `contents`) the RPC takes.
    pub fn from_json(v: &Value) -> Result<Self> {
        let branch =
            v.get("branch").and_then(Value::as_str).ok_or_else(|| Error::encoding("operation without branch"))?;
        let branch = BlockHash::from_b58check(branch).map_err(Error::encoding)?;
        let contents = v
            .get("contents")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::encoding("operation without contents"))?
            .iter()
            .map(Content::from_json)
            .collect::<Result<Vec<_>>>()?;
        Ok(OperationGroup { branch, contents })
    }

    /// Reads an unsigned group from its binary form.
    pub fn unforge(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data);
        let branch = BlockHash::try_from_bytes(r.take(32)?).map_err(Error::encoding)?;
        let mut contents = Vec::new();
        while !r.is_empty() {
            contents.push(r.content()?);
        }
        if contents.is_empty() {
            return Err(Error::encoding("an operation group without contents"));
        }
        Ok(OperationGroup { branch, contents })
    }
}

/// The bytes an operation's signature covers (before hashing): watermark || forged bytes.
pub fn signing_payload(forged: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(forged.len() + 1);
    out.push(WATERMARK_GENERIC);
    out.extend_from_slice(forged);
    out
}

/// The hash of a signed operation (`o...`).
pub fn operation_hash(signed: &[u8]) -> OperationHash {
    // digest_256 is always 32 bytes, the size of an operation hash.
    OperationHash::try_from_bytes(&blake2b::digest_256(signed))
        .unwrap_or_else(|_| unreachable!("blake2b-256 has the size of an operation hash"))
}

/// A forged and signed operation group, ready to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedOperation {
    /// What was signed.
    pub group: OperationGroup,
    /// Its binary form.
    pub forged: Vec<u8>,
    /// Ed25519 signature over blake2b-256(0x03 || forged).
    pub signature: [u8; 64],
}

impl SignedOperation {
    /// Forged bytes followed by the signature: what is injected.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.forged.len() + 64);
        out.extend_from_slice(&self.forged);
        out.extend_from_slice(&self.signature);
        out
    }

    /// [`SignedOperation::bytes`] in hex, the body of `POST /injection/operation`.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes())
    }

    /// The operation hash (`o...`).
    pub fn hash(&self) -> OperationHash {
        operation_hash(&self.bytes())
    }

    /// The signature in base58check (`edsig...`).
    pub fn signature_b58(&self) -> String {
        // 64 bytes is the size of an Ed25519 signature.
        Ed25519Signature::try_from_bytes(&self.signature)
            .map(|s| s.to_b58check())
            .unwrap_or_else(|_| unreachable!("a 64-byte Ed25519 signature"))
    }

    /// The JSON form with its signature (`run_operation` takes it).
    pub fn to_json(&self) -> Value {
        self.group.to_json(Some(&self.signature_b58()))
    }

    /// Reads a signed operation: forged bytes, then the 64-byte signature.
    pub fn unforge(data: &[u8]) -> Result<Self> {
        let Some(split) = data.len().checked_sub(64) else {
            return Err(Error::encoding("a signed operation shorter than its signature"));
        };
        let (forged, sig) = data.split_at(split);
        let group = OperationGroup::unforge(forged)?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(sig);
        Ok(SignedOperation { group, forged: forged.to_vec(), signature })
    }
}

#[cfg(test)]
mod tests {
    use tezos_crypto_rs::hash::ContractKt1Hash;

    use super::*;
    use crate::forge::{ManagerFields, Micheline, Parameters};

    #[test]
    fn group_json_round_trips() {
        let key = crate::keys::TezosKey::from_seed([1; 32]);
        let m = ManagerFields { source: key.address().clone(), fee: 1, counter: 2, gas_limit: 3, storage_limit: 4 };
        let group = OperationGroup {
            branch: BlockHash::try_from_bytes(&[9; 32]).unwrap(),
            contents: vec![
                Content::Reveal { manager: m.clone(), public_key: key.public_key().clone() },
                Content::Transaction {
                    manager: m,
                    amount: 0,
                    destination: ContractKt1Hash::try_from_bytes(&[4; 20]).unwrap(),
                    parameters: Some(Parameters { entrypoint: "anchor".into(), value: Micheline::int(5) }),
                },
            ],
        };
        assert_eq!(OperationGroup::from_json(&group.to_json(None)).unwrap(), group);
        let bytes = group.forge().unwrap();
        assert_eq!(OperationGroup::unforge(&bytes).unwrap(), group);
    }

    mod props {
        use proptest::prelude::*;
        use tezos_crypto_rs::hash::ContractKt1Hash;

        use super::super::*;
        use crate::contract::AnchorParameter;
        use crate::forge::{ManagerFields, Parameters};
        use crate::keys::TezosKey;

        proptest! {
            #[test]
            fn groups_round_trip(
                seed in any::<[u8; 32]>(),
                numbers in any::<[u64; 9]>(),
                chain in ".{0,40}",
                root in any::<[u8; 32]>(),
                reveal in any::<bool>(),
            ) {
                let key = TezosKey::from_seed(seed);
                let m = |i: usize| ManagerFields {
                    source: key.address().clone(),
                    fee: numbers[i],
                    counter: numbers[i + 1],
                    gas_limit: numbers[i + 2],
                    storage_limit: numbers[i + 3],
                };
                let p = AnchorParameter { chain, tree_size: numbers[8], root, height: numbers[0] };
                let mut contents = Vec::new();
                if reveal {
                    contents.push(Content::Reveal { manager: m(0), public_key: key.public_key().clone() });
                }
                contents.push(Content::Transaction {
                    manager: m(4),
                    amount: numbers[5],
                    destination: ContractKt1Hash::try_from_bytes(&seed[..20]).unwrap(),
                    parameters: Some(Parameters { entrypoint: "anchor".into(), value: p.to_micheline() }),
                });
                let group = OperationGroup { branch: BlockHash::try_from_bytes(&root).unwrap(), contents };
                let signed = key.sign(group.clone()).unwrap();
                prop_assert_eq!(SignedOperation::unforge(&signed.bytes()).unwrap(), signed);
                prop_assert_eq!(OperationGroup::from_json(&group.to_json(None)).unwrap(), group);
            }
        }
    }
}
