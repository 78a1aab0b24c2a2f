//! One Tezos anchoring target, as configured (the node reads a list of them under
//! `[[anchor.tezos]]`).

use serde::{Deserialize, Serialize};
use tezos_crypto_rs::hash::ContractKt1Hash;

/// A Tezos network with the anchoring contract, and the account that calls it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TezosTarget {
    /// Name of the target (the key of its anchor records), 1..=32 of a-z, 0-9, '-'.
    pub name: String,
    /// Octez node RPC URL (`http://127.0.0.1:8732`).
    pub rpc_url: String,
    /// The anchoring contract (`KT1...`), originated with this account as admin.
    pub contract: String,
    /// Ed25519 key (`edsk...` text) of the anchoring account, relative to the node directory;
    /// created (mode 0600) when missing. Fund its `tz1` address.
    pub key_file: String,
    /// Blocks on top of the anchor's block before it is recorded (Tezos is final after 2).
    pub confirmations: u64,
    /// Seconds between anchors (of the latest checkpoint, when newer than the last anchor).
    pub interval_secs: u64,
    /// Most fees one anchor may pay, in mutez (1 tez = 1,000,000 mutez).
    pub fee_cap_mutez: u64,
    /// Milliseconds between two looks at the node while waiting for a block.
    pub poll_interval_ms: u64,
    /// Blocks after which an anchor not yet in a block counts as dropped and is sent again,
    /// counted from its branch (two blocks below the head when it was sent).
    pub max_wait_blocks: u64,
}

impl Default for TezosTarget {
    fn default() -> Self {
        Self {
            name: "tezos".into(),
            rpc_url: "http://127.0.0.1:8732".into(),
            contract: String::new(),
            key_file: "anchor-tezos.key".into(),
            confirmations: 2,
            interval_secs: 3600,
            fee_cap_mutez: 100_000,
            poll_interval_ms: 2_000,
            max_wait_blocks: 60,
        }
    }
}

impl TezosTarget {
    /// Every problem with this target, one message each.
    pub fn validate(&self) -> Vec<String> {
        let at = format!("[[anchor.tezos]] {:?}", self.name);
        let mut errors = Vec::new();
        if kalima_core::ledger::validate_bridge_name(&self.name).is_err() {
            errors.push(format!("{at} name: must be 1..=32 of a-z, 0-9, '-'"));
        }
        match reqwest::Url::parse(&self.rpc_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => errors.push(format!("{at} rpc_url: {:?} is not an http(s) URL", self.rpc_url)),
        }
        if ContractKt1Hash::from_base58_check(&self.contract).is_err() {
            errors.push(format!("{at} contract: {:?} is not a contract address (KT1...)", self.contract));
        }
        if self.key_file.trim().is_empty() {
            errors.push(format!("{at} key_file: must name a file"));
        }
        if self.interval_secs == 0 {
            errors.push(format!("{at} interval_secs: must be above 0"));
        }
        if self.fee_cap_mutez == 0 {
            errors.push(format!("{at} fee_cap_mutez: must be above 0"));
        }
        if self.poll_interval_ms == 0 {
            errors.push(format!("{at} poll_interval_ms: must be above 0"));
        }
        if self.max_wait_blocks == 0 {
            errors.push(format!("{at} max_wait_blocks: must be above 0"));
        }
        if self.confirmations > 1_000 {
            errors.push(format!("{at} confirmations: {} is more than 1000 blocks", self.confirmations));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let t: TezosTarget = serde_json::from_str(
            r#"{"rpc_url": "https://rpc.example", "contract": "KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi"}"#,
        )
        .unwrap();
        assert_eq!(t.name, "tezos");
        assert_eq!(t.key_file, "anchor-tezos.key");
        assert_eq!((t.confirmations, t.interval_secs, t.max_wait_blocks), (2, 3600, 60));
        assert!(t.validate().is_empty(), "{:?}", t.validate());
    }

    /// The example in the README is a valid `[[anchor.tezos]]` list (with a real KT1).
    #[test]
    fn readme_example_parses() {
        #[derive(Deserialize)]
        struct Anchor {
            tezos: Vec<TezosTarget>,
        }
        #[derive(Deserialize)]
        struct Root {
            anchor: Anchor,
        }
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let text = readme[start..end].replace("KT1...", "KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi");
        let root: Root = toml::from_str(&text).unwrap();
        assert_eq!(root.anchor.tezos.len(), 1);
        let t = &root.anchor.tezos[0];
        assert_eq!(
            *t,
            TezosTarget { contract: "KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi".into(), ..TezosTarget::default() }
        );
        assert!(t.validate().is_empty(), "{:?}", t.validate());
    }

    #[test]
    fn reports_every_problem() {
        let t = TezosTarget {
            name: "Tezos!".into(),
            rpc_url: "ftp://x".into(),
            contract: "tz1VSUr8wwNhLAzempoch5d6hLRiTh8Cjcjb".into(),
            key_file: " ".into(),
            interval_secs: 0,
            fee_cap_mutez: 0,
            poll_interval_ms: 0,
            max_wait_blocks: 0,
            confirmations: 5_000,
        };
        let errors = t.validate();
        assert_eq!(errors.len(), 9, "{errors:#?}");
        assert!(errors.iter().all(|e| e.starts_with("[[anchor.tezos]]")));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(serde_json::from_str::<TezosTarget>(r#"{"contrat": "KT1"}"#).is_err());
    }
}
