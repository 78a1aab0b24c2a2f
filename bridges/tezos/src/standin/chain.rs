//! The stand-in's state and its chain model: blocks and the operations included in them, the
//! mempool, the context at the head (counters, revealed keys, the anchoring contract's storage),
//! Octez's prevalidation, the contract's rules, baking, and scripted reorgs.

use std::collections::HashMap;

use serde_json::{Value, json};
use tezos_crypto_rs::PublicKeyWithHash;
use tezos_crypto_rs::blake2b;
use tezos_crypto_rs::hash::{BlockHash, HashTrait, PublicKeyEd25519};

use super::recorded::{
    RECORDED_ERROR_COUNTER_IN_THE_PAST, Recorded, octez_error, recorded, recorded_header_field, script_rejected,
};
use super::{Faults, Injection, StandInConfig};
use crate::contract::{AnchorParameter, ENTRYPOINT};
use crate::forge::{Content, OperationGroup, SignedOperation};

pub(super) struct Included {
    pub(super) hash: String,
    pub(super) op: SignedOperation,
    pub(super) json: Value,
    pub(super) applied: bool,
}

pub(super) struct Block {
    pub(super) level: u64,
    pub(super) hash: String,
    pub(super) predecessor: String,
    pub(super) ops: Vec<Included>,
}

/// The context at the head: counters, revealed keys, the contract's storage.
#[derive(Clone, Default)]
pub(super) struct Ctx {
    pub(super) counters: HashMap<String, u64>,
    pub(super) keys: HashMap<String, PublicKeyEd25519>,
    pub(super) last: HashMap<Vec<u8>, u64>,
}

/// What one content did.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    Applied { milligas: u64, paid: u64 },
    Failed(Vec<Value>),
    Backtracked { milligas: u64 },
    Skipped,
}

pub(super) struct StandIn {
    pub(super) config: StandInConfig,
    pub(super) faults: Faults,
    pub(super) recorded: Recorded,
    pub(super) blocks: Vec<Block>,
    pub(super) mempool: Vec<(String, SignedOperation)>,
    pub(super) salt: u64,
    pub(super) simulations: Vec<OperationGroup>,
    pub(super) injections: Vec<Injection>,
    pub(super) problems: Vec<String>,
    pub(super) overrides: HashMap<String, (u16, String)>,
    pub(super) requests: Vec<String>,
    /// Blocks whose operation hashes were served while they held operations.
    pub(super) seen: std::collections::HashSet<String>,
}

impl StandIn {
    pub(super) fn head(&self) -> &Block {
        // There is always a block: the first one is made at start and reorgs replace, never
        // remove, blocks.
        self.blocks.last().unwrap_or_else(|| unreachable!("the stand-in chain has blocks"))
    }

    pub(super) fn block(&self, id: &str) -> Option<&Block> {
        let head = self.head().level;
        let level = if id == "head" {
            head
        } else if let Some(n) = id.strip_prefix("head~") {
            head.checked_sub(n.parse().ok()?)?
        } else if let Ok(l) = id.parse::<u64>() {
            l
        } else {
            return self.blocks.iter().find(|b| b.hash == id);
        };
        self.blocks.iter().find(|b| b.level == level)
    }

    fn genesis_ctx(&self) -> Ctx {
        let mut ctx = Ctx::default();
        for (a, c) in &self.config.accounts {
            ctx.counters.insert(a.clone(), *c);
        }
        for pk in &self.config.revealed {
            ctx.keys.insert(pk.pk_hash().to_b58check(), pk.clone());
        }
        for (chain, ts) in &self.config.anchored {
            ctx.last.insert(chain.as_bytes().to_vec(), *ts);
        }
        ctx
    }

    pub(super) fn ctx(&self) -> Ctx {
        let mut ctx = self.genesis_ctx();
        for b in &self.blocks {
            for o in &b.ops {
                let outcomes = self.evaluate(&ctx, &o.op.group);
                apply(&mut ctx, &o.op.group, &outcomes);
            }
        }
        ctx
    }

    /// Errors that keep an operation out of a block altogether (Octez's prevalidation).
    pub(super) fn precheck(&self, ctx: &Ctx, group: &OperationGroup) -> Result<(), Vec<Value>> {
        let mut next: HashMap<String, u64> = HashMap::new();
        let mut revealed_here = false;
        for c in &group.contents {
            let m = c.manager();
            let src = m.source.to_b58check();
            let Some(base) = ctx.counters.get(&src) else {
                return Err(vec![octez_error("implicit.empty_implicit_contract", json!({"implicit": src}))]);
            };
            let expected = *next.get(&src).unwrap_or(&(base + 1));
            if m.counter < expected {
                let mut e = recorded(RECORDED_ERROR_COUNTER_IN_THE_PAST);
                e[0]["contract"] = json!(src);
                e[0]["expected"] = json!(expected.to_string());
                e[0]["found"] = json!(m.counter.to_string());
                return Err(e.as_array().cloned().unwrap_or_default());
            }
            if m.counter > expected {
                return Err(vec![octez_error(
                    "contract.counter_in_the_future",
                    json!({"contract": src, "expected": expected.to_string(), "found": m.counter.to_string()}),
                )]);
            }
            next.insert(src.clone(), expected + 1);
            match c {
                Content::Reveal { .. } => revealed_here = true,
                Content::Transaction { .. } => {
                    if !revealed_here && !ctx.keys.contains_key(&src) {
                        return Err(vec![octez_error("contract.unrevealed_key", json!({"contract": src}))]);
                    }
                }
            }
        }
        Ok(())
    }

    /// What each content does on top of `ctx` (the anchoring contract's rules included).
    pub(super) fn evaluate(&self, ctx: &Ctx, group: &OperationGroup) -> Vec<Outcome> {
        let mut local = ctx.clone();
        let mut outcomes: Vec<Outcome> = Vec::new();
        for c in &group.contents {
            if outcomes.iter().any(|o| matches!(o, Outcome::Failed(_))) {
                outcomes.push(Outcome::Skipped);
                continue;
            }
            let o = self.evaluate_one(&local, c);
            if let Outcome::Applied { .. } = o {
                apply_one(&mut local, c);
            } else {
                for earlier in outcomes.iter_mut() {
                    if let Outcome::Applied { milligas, .. } = earlier {
                        *earlier = Outcome::Backtracked { milligas: *milligas };
                    }
                }
            }
            outcomes.push(o);
        }
        outcomes
    }

    fn evaluate_one(&self, ctx: &Ctx, c: &Content) -> Outcome {
        let m = c.manager();
        let src = m.source.to_b58check();
        let gas_exhausted = || Outcome::Failed(vec![octez_error("gas_exhausted.operation", json!({}))]);
        match c {
            Content::Reveal { public_key, .. } => {
                if ctx.keys.contains_key(&src) {
                    return Outcome::Failed(vec![octez_error(
                        "contract.previously_revealed_key",
                        json!({"contract": src}),
                    )]);
                }
                if public_key.pk_hash() != m.source {
                    return Outcome::Failed(vec![octez_error(
                        "contract.manager.inconsistent_hash",
                        json!({"public_key": public_key.to_b58check(), "expected_hash": src}),
                    )]);
                }
                if m.gas_limit * 1000 < self.recorded.reveal_milligas {
                    return gas_exhausted();
                }
                Outcome::Applied { milligas: self.recorded.reveal_milligas, paid: 0 }
            }
            Content::Transaction { amount, destination, parameters, .. } => {
                let contract = destination.to_b58check();
                if contract != self.config.contract {
                    return Outcome::Failed(vec![octez_error(
                        "contract.non_existing_contract",
                        json!({"contract": contract}),
                    )]);
                }
                let Some(p) = parameters.as_ref().filter(|p| p.entrypoint == ENTRYPOINT) else {
                    return Outcome::Failed(vec![octez_error(
                        "michelson_v1.bad_contract_parameter",
                        json!({"contract": contract}),
                    )]);
                };
                if *amount != 0 {
                    return Outcome::Failed(script_rejected(&contract, "AMOUNT_NOT_ZERO"));
                }
                if src != self.config.admin {
                    return Outcome::Failed(script_rejected(&contract, "NOT_ADMIN"));
                }
                let a = match AnchorParameter::from_micheline(&p.value) {
                    Ok(a) => a,
                    Err(e) if e.contains("root") => {
                        return Outcome::Failed(script_rejected(&contract, "ROOT_NOT_32_BYTES"));
                    }
                    Err(_) => {
                        return Outcome::Failed(vec![octez_error(
                            "michelson_v1.bad_contract_parameter",
                            json!({"contract": contract}),
                        )]);
                    }
                };
                let previous = ctx.last.get(a.chain.as_bytes());
                if previous.is_some_and(|last| *last >= a.tree_size) {
                    return Outcome::Failed(script_rejected(&contract, "TREE_SIZE_NOT_NEWER"));
                }
                let milligas = self.recorded.tx_milligas + self.recorded.event_milligas;
                if m.gas_limit * 1000 < milligas {
                    return gas_exhausted();
                }
                let paid = if previous.is_none() { self.recorded.first_paid } else { 0 };
                if m.storage_limit < paid {
                    return Outcome::Failed(vec![octez_error("storage_exhausted.operation", json!({}))]);
                }
                Outcome::Applied { milligas, paid }
            }
        }
    }

    fn new_block_hash(&mut self, level: u64) -> String {
        self.salt += 1;
        let digest = blake2b::digest_256(format!("stand-in block {level} {}", self.salt).as_bytes());
        BlockHash::try_from_bytes(&digest).map(|h| h.to_b58check()).unwrap_or_default()
    }

    pub(super) fn bake(&mut self) {
        let mut ctx = self.ctx();
        let head = self.head();
        let (level, predecessor) = (head.level + 1, head.hash.clone());
        let mut ops = Vec::new();
        for (hash, op) in std::mem::take(&mut self.mempool) {
            if self.precheck(&ctx, &op.group).is_err() {
                continue; // outdated: Octez drops it
            }
            let outcomes = self.evaluate(&ctx, &op.group);
            apply(&mut ctx, &op.group, &outcomes);
            let applied = outcomes.iter().all(|o| matches!(o, Outcome::Applied { .. }));
            let json = json!({
                "protocol": recorded_header_field("protocol"),
                "chain_id": recorded_header_field("chain_id"),
                "hash": hash,
                "branch": op.group.branch.to_b58check(),
                "contents": self.contents_json(&op.group, &outcomes, "block"),
                "signature": op.signature_b58(),
            });
            ops.push(Included { hash, op, json, applied });
        }
        let hash = self.new_block_hash(level);
        self.blocks.push(Block { level, hash, predecessor, ops });
        self.maybe_reorg();
    }

    /// Replaces the blocks from the last one below the head that holds operations a client
    /// has seen, when a reorg is scripted.
    fn maybe_reorg(&mut self) {
        if self.faults.reorgs == 0 || self.blocks.len() < 2 {
            return;
        }
        let below_head = &self.blocks[..self.blocks.len() - 1];
        let Some(i) = below_head.iter().rposition(|b| !b.ops.is_empty() && self.seen.contains(&b.hash)) else {
            return;
        };
        self.faults.reorgs -= 1;
        let removed: Vec<Block> = self.blocks.drain(i..).collect();
        let mut requeue = Vec::new();
        for b in removed {
            for o in b.ops {
                if self.faults.requeue_on_reorg {
                    requeue.push((o.hash, o.op));
                }
            }
            let predecessor = self.head().hash.clone();
            let hash = self.new_block_hash(b.level);
            self.blocks.push(Block { level: b.level, hash, predecessor, ops: Vec::new() });
        }
        requeue.append(&mut self.mempool);
        self.mempool = requeue;
    }
}

fn apply_one(ctx: &mut Ctx, c: &Content) {
    let m = c.manager();
    let src = m.source.to_b58check();
    match c {
        Content::Reveal { public_key, .. } => {
            ctx.keys.insert(src, public_key.clone());
        }
        Content::Transaction { parameters: Some(p), .. } => {
            if let Ok(a) = AnchorParameter::from_micheline(&p.value) {
                ctx.last.insert(a.chain.into_bytes(), a.tree_size);
            }
        }
        Content::Transaction { .. } => {}
    }
}

/// Effects of an included group: counters always move; applied contents take effect.
fn apply(ctx: &mut Ctx, group: &OperationGroup, outcomes: &[Outcome]) {
    let all_applied = outcomes.iter().all(|o| matches!(o, Outcome::Applied { .. }));
    for c in &group.contents {
        let m = c.manager();
        ctx.counters.insert(m.source.to_b58check(), m.counter);
        if all_applied {
            apply_one(ctx, c);
        }
    }
}
