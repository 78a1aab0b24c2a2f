//! The contents of a manager operation, a `reveal` or a `transaction` to a KT1 contract, with
//! their manager fields and parameters: the binary form, and the JSON form the Octez RPC takes
//! and returns.

use serde_json::{Value, json};
use tezos_crypto_rs::hash::{ContractKt1Hash, ContractTz1Hash, HashTrait, PublicKeyEd25519};

use super::binary::{put_dynamic, put_n};
use super::micheline::Micheline;
use super::{TAG_REVEAL, TAG_TRANSACTION, short};
use crate::error::{Error, Result};

/// Entrypoints with a one-byte code in the binary encoding; any other is `0xff` + its name.
pub(super) const RESERVED_ENTRYPOINTS: [&str; 10] = [
    "default",
    "root",
    "do",
    "set_delegate",
    "remove_delegate",
    "deposit",
    "stake",
    "unstake",
    "finalize_unstake",
    "set_delegate_parameters",
];

/// The fields every manager operation carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerFields {
    /// The paying account.
    pub source: ContractTz1Hash,
    /// Fee in mutez.
    pub fee: u64,
    /// The account's counter for this operation (its current counter + 1, + 1 per earlier
    /// content of the group).
    pub counter: u64,
    /// Most gas units the operation may use.
    pub gas_limit: u64,
    /// Most bytes of storage it may pay for.
    pub storage_limit: u64,
}

/// A call's entrypoint and argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    /// Entrypoint name (`anchor`).
    pub entrypoint: String,
    /// The argument.
    pub value: Micheline,
}

/// One content of an operation group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Publishes the source's public key (needed once, before its first other operation).
    Reveal {
        /// Manager fields.
        manager: ManagerFields,
        /// The key whose hash is the source.
        public_key: PublicKeyEd25519,
    },
    /// A call of (or a transfer to) a contract.
    Transaction {
        /// Manager fields.
        manager: ManagerFields,
        /// Mutez sent along.
        amount: u64,
        /// The contract.
        destination: ContractKt1Hash,
        /// Entrypoint and argument; `None` for a plain transfer to `default` with `Unit`.
        parameters: Option<Parameters>,
    },
}

impl Content {
    /// Its manager fields.
    pub fn manager(&self) -> &ManagerFields {
        match self {
            Content::Reveal { manager, .. } | Content::Transaction { manager, .. } => manager,
        }
    }

    /// Its manager fields, to set limits and fees.
    pub fn manager_mut(&mut self) -> &mut ManagerFields {
        match self {
            Content::Reveal { manager, .. } | Content::Transaction { manager, .. } => manager,
        }
    }

    /// `reveal` or `transaction`, as the RPC names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Content::Reveal { .. } => "reveal",
            Content::Transaction { .. } => "transaction",
        }
    }

    /// Appends its binary form to `out`.
    pub fn forge_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let m = self.manager();
        out.push(match self {
            Content::Reveal { .. } => TAG_REVEAL,
            Content::Transaction { .. } => TAG_TRANSACTION,
        });
        // An implicit account as a source: the public key hash alone, tag 0 = Ed25519.
        out.push(0x00);
        out.extend_from_slice(m.source.as_ref());
        put_n(m.fee, out);
        put_n(m.counter, out);
        put_n(m.gas_limit, out);
        put_n(m.storage_limit, out);
        match self {
            Content::Reveal { public_key, .. } => {
                out.push(0x00); // Ed25519 key
                out.extend_from_slice(public_key.as_ref());
                out.push(0x00); // no proof of possession (only tz4 keys have one)
            }
            Content::Transaction { amount, destination, parameters, .. } => {
                put_n(*amount, out);
                // An originated contract: tag 1, its 20-byte hash, one byte of padding.
                out.push(0x01);
                out.extend_from_slice(destination.as_ref());
                out.push(0x00);
                match parameters {
                    None => out.push(0x00),
                    Some(p) => {
                        out.push(0xff);
                        forge_entrypoint(&p.entrypoint, out)?;
                        put_dynamic(&p.value.to_bytes()?, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Its binary form.
    pub fn forge(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.forge_into(&mut out)?;
        Ok(out)
    }

    /// The JSON form the Octez RPC takes and returns.
    pub fn to_json(&self) -> Value {
        let m = self.manager();
        let mut o = json!({
            "kind": self.kind(),
            "source": m.source.to_b58check(),
            "fee": m.fee.to_string(),
            "counter": m.counter.to_string(),
            "gas_limit": m.gas_limit.to_string(),
            "storage_limit": m.storage_limit.to_string(),
        });
        match self {
            Content::Reveal { public_key, .. } => {
                o["public_key"] = json!(public_key.to_b58check());
            }
            Content::Transaction { amount, destination, parameters, .. } => {
                o["amount"] = json!(amount.to_string());
                o["destination"] = json!(destination.to_b58check());
                if let Some(p) = parameters {
                    o["parameters"] = json!({ "entrypoint": p.entrypoint, "value": p.value.to_json() });
                }
            }
        }
        o
    }
}

impl Content {
    /// Reads the JSON form the Octez RPC uses (reveal and transaction to a KT1 only).
    pub fn from_json(v: &Value) -> Result<Self> {
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| Error::encoding(format!("content without {k}: {}", short(v))))
        };
        let num = |k: &str| text(k)?.parse::<u64>().map_err(|e| Error::encoding(format!("content {k}: {e}")));
        let manager = ManagerFields {
            source: ContractTz1Hash::from_b58check(text("source")?).map_err(Error::encoding)?,
            fee: num("fee")?,
            counter: num("counter")?,
            gas_limit: num("gas_limit")?,
            storage_limit: num("storage_limit")?,
        };
        match text("kind")? {
            "reveal" => {
                let public_key = PublicKeyEd25519::from_b58check(text("public_key")?).map_err(Error::encoding)?;
                Ok(Content::Reveal { manager, public_key })
            }
            "transaction" => {
                let destination = ContractKt1Hash::from_b58check(text("destination")?).map_err(Error::encoding)?;
                let parameters = match v.get("parameters") {
                    None | Some(Value::Null) => None,
                    Some(p) => {
                        let entrypoint = p
                            .get("entrypoint")
                            .and_then(Value::as_str)
                            .ok_or_else(|| Error::encoding("parameters without entrypoint"))?;
                        let value = Micheline::from_json(
                            p.get("value").ok_or_else(|| Error::encoding("parameters without value"))?,
                        )?;
                        Some(Parameters { entrypoint: entrypoint.to_string(), value })
                    }
                };
                Ok(Content::Transaction { manager, amount: num("amount")?, destination, parameters })
            }
            k => Err(Error::encoding(format!("content kind {k:?}: only reveal and transaction"))),
        }
    }
}

fn forge_entrypoint(name: &str, out: &mut Vec<u8>) -> Result<()> {
    if let Some(i) = RESERVED_ENTRYPOINTS.iter().position(|e| *e == name) {
        out.push(i as u8);
        return Ok(());
    }
    if name.is_empty() || name.len() > 31 {
        return Err(Error::encoding(format!("entrypoint {name:?} must be 1..=31 bytes")));
    }
    out.push(0xff);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}
