//! A stand-in for an Octez node's RPC, for tests (no Octez node runs where the tests run).
//!
//! An axum server on `127.0.0.1:0` answers the calls this crate makes with bodies shaped as
//! Octez returns them for protocol Tallinn (024): the recorded responses in
//! `tests/it/octez/*.json` are its templates, and only the fields that depend on the call
//! (levels, hashes, counters, fees, the anchored values) are filled in. Behind it sits a tiny
//! chain: blocks baked on a timer or on demand, a mempool, counters, revealed keys and the
//! anchoring contract's rules (admin, tree sizes moving forward, 32-byte roots). Faults are
//! scripted: reorgs that take an operation out of its block, injections that are lost.
//!
//! It also checks what it receives: injected bytes must decode, carry a valid signature of
//! the source, match a simulated operation (up to fees and limits), pay at least the minimal
//! fees and give enough gas and storage. Anything wrong is kept in [`StandInOctez::problems`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tezos_crypto_rs::PublicKeyWithHash;
use tezos_crypto_rs::base58::ToBase58Check;
use tezos_crypto_rs::blake2b;
use tezos_crypto_rs::hash::{BlockHash, HashTrait, PublicKeyEd25519};

use crate::contract::{AnchorParameter, ENTRYPOINT};
use crate::forge::{Content, Micheline, OperationGroup, SignedOperation, operation_hash};
use crate::keys::verify_forged;

/// A recorded block header (Tallinn).
pub const RECORDED_HEADER: &str = include_str!("../tests/it/octez/header.json");
/// Recorded protocol constants (Tallinn, abridged).
pub const RECORDED_CONSTANTS: &str = include_str!("../tests/it/octez/constants.json");
/// A recorded `run_operation` answer: a reveal and the first anchor of a chain, applied.
pub const RECORDED_RUN_REVEAL_AND_ANCHOR: &str = include_str!("../tests/it/octez/run_operation_reveal_and_anchor.json");
/// A recorded `run_operation` answer: an anchor refused by the contract (FAILWITH).
pub const RECORDED_RUN_FAILWITH: &str = include_str!("../tests/it/octez/run_operation_anchor_failwith.json");
/// Recorded manager operations of a block: a tez transfer, then an applied anchor.
pub const RECORDED_OPERATIONS_ANCHOR: &str = include_str!("../tests/it/octez/operations_3_anchor.json");
/// Recorded manager operations of a block: a refused anchor, then a call of another contract.
pub const RECORDED_OPERATIONS_REFUSED_AND_FOREIGN: &str =
    include_str!("../tests/it/octez/operations_3_refused_and_foreign.json");
/// A recorded error: the counter is in the past.
pub const RECORDED_ERROR_COUNTER_IN_THE_PAST: &str = include_str!("../tests/it/octez/error_counter_in_the_past.json");
/// A recorded error: the mempool holds a conflicting operation of the same manager.
pub const RECORDED_ERROR_CONFLICT: &str = include_str!("../tests/it/octez/error_operation_conflict.json");

/// The account of the recorded responses (`TezosKey::from_seed([7; 32])`).
pub const RECORDED_ADMIN: &str = "tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL";
/// The anchoring contract of the recorded responses.
pub const RECORDED_CONTRACT: &str = "KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi";

fn recorded(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| unreachable!("a recorded Octez response is JSON: {e}"))
}

/// What the stand-in starts from.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// The anchoring contract's address.
    pub contract: String,
    /// Its admin (the only account allowed to anchor).
    pub admin: String,
    /// Funded accounts and their counters.
    pub accounts: Vec<(String, u64)>,
    /// Accounts whose key is already revealed.
    pub revealed: Vec<PublicKeyEd25519>,
    /// The contract's storage: the last tree size anchored per chain name.
    pub anchored: Vec<(String, u64)>,
    /// Bake a block this often; `None` bakes only on [`StandInOctez::bake`].
    pub block_time: Option<Duration>,
    /// Level of the first block.
    pub first_level: u64,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            contract: RECORDED_CONTRACT.into(),
            admin: RECORDED_ADMIN.into(),
            accounts: vec![(RECORDED_ADMIN.into(), 41)],
            revealed: Vec::new(),
            anchored: Vec::new(),
            block_time: Some(Duration::from_millis(40)),
            first_level: 11_432_100,
        }
    }
}

/// Scripted faults.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// How many times a block holding a manager operation is replaced by a block without it,
    /// once one block is on top of it and a client has seen the operation in it.
    pub reorgs: u32,
    /// Whether the operations of a replaced block go back to the mempool (as Octez does), or
    /// are lost.
    pub requeue_on_reorg: bool,
    /// How many injections are answered with their hash but never reach a block.
    pub lose_injections: u32,
}

/// One injection, as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The hash of the injected bytes.
    pub hash: String,
    /// The decoded operation, when the bytes decode.
    pub operation: Option<SignedOperation>,
    /// Whether the node took it (answered with its hash).
    pub accepted: bool,
    /// Why it was refused.
    pub refusal: Option<String>,
    /// The head's level when it came.
    pub head_level: u64,
}

struct Included {
    hash: String,
    op: SignedOperation,
    json: Value,
    applied: bool,
}

struct Block {
    level: u64,
    hash: String,
    predecessor: String,
    ops: Vec<Included>,
}

/// The context at the head: counters, revealed keys, the contract's storage.
#[derive(Clone, Default)]
struct Ctx {
    counters: HashMap<String, u64>,
    keys: HashMap<String, PublicKeyEd25519>,
    last: HashMap<Vec<u8>, u64>,
}

/// What one content did.
#[derive(Debug, Clone)]
enum Outcome {
    Applied { milligas: u64, paid: u64 },
    Failed(Vec<Value>),
    Backtracked { milligas: u64 },
    Skipped,
}

struct Recorded {
    reveal_meta: Value,
    tx_meta: Value,
    failed_meta: Value,
    reveal_milligas: u64,
    tx_milligas: u64,
    event_milligas: u64,
    first_paid: u64,
}

struct StandIn {
    config: StandInConfig,
    faults: Faults,
    recorded: Recorded,
    blocks: Vec<Block>,
    mempool: Vec<(String, SignedOperation)>,
    salt: u64,
    simulations: Vec<OperationGroup>,
    injections: Vec<Injection>,
    problems: Vec<String>,
    overrides: HashMap<String, (u16, String)>,
    requests: Vec<String>,
    /// Blocks whose operation hashes were served while they held operations.
    seen: std::collections::HashSet<String>,
}

/// A stand-in Octez node; stopped on drop.
pub struct StandInOctez {
    /// Its RPC URL (`http://127.0.0.1:PORT`).
    pub url: String,
    state: Arc<Mutex<StandIn>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StandInOctez {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StandInOctez {
    /// Starts a stand-in node.
    pub async fn start(config: StandInConfig, faults: Faults) -> std::io::Result<Self> {
        let run = recorded(RECORDED_RUN_REVEAL_AND_ANCHOR);
        let failed = recorded(RECORDED_RUN_FAILWITH);
        let milligas = |v: &Value, p: &str| v.pointer(p).and_then(crate::rpc::value_u64).unwrap_or(0);
        let recorded = Recorded {
            reveal_meta: run.pointer("/contents/0/metadata").cloned().unwrap_or(Value::Null),
            tx_meta: run.pointer("/contents/1/metadata").cloned().unwrap_or(Value::Null),
            failed_meta: failed.pointer("/contents/0/metadata").cloned().unwrap_or(Value::Null),
            reveal_milligas: milligas(&run, "/contents/0/metadata/operation_result/consumed_milligas"),
            tx_milligas: milligas(&run, "/contents/1/metadata/operation_result/consumed_milligas"),
            event_milligas: milligas(
                &run,
                "/contents/1/metadata/internal_operation_results/0/result/consumed_milligas",
            ),
            first_paid: milligas(&run, "/contents/1/metadata/operation_result/paid_storage_size_diff"),
        };
        let first = Block {
            level: config.first_level,
            hash: recorded_header_field("hash"),
            predecessor: recorded_header_field("predecessor"),
            ops: Vec::new(),
        };
        let block_time = config.block_time;
        let state = Arc::new(Mutex::new(StandIn {
            config,
            faults,
            recorded,
            blocks: vec![first],
            mempool: Vec::new(),
            salt: 0,
            simulations: Vec::new(),
            injections: Vec::new(),
            problems: Vec::new(),
            overrides: HashMap::new(),
            requests: Vec::new(),
            seen: Default::default(),
        }));
        // Two blocks so that `head~2` exists from the start.
        {
            let mut s = state.lock();
            s.bake();
            s.bake();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let mut tasks = vec![tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })];
        if let Some(every) = block_time {
            let s = state.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    s.lock().bake();
                }
            }));
        }
        Ok(Self { url, state, tasks })
    }

    /// Bakes one block (with the mempool's operations).
    pub fn bake(&self) {
        self.state.lock().bake();
    }

    /// The head's level.
    pub fn head_level(&self) -> u64 {
        self.state.lock().head().level
    }

    /// Operations waiting for a block.
    pub fn mempool_len(&self) -> usize {
        self.state.lock().mempool.len()
    }

    /// Every injection so far.
    pub fn injections(&self) -> Vec<Injection> {
        self.state.lock().injections.clone()
    }

    /// Every simulated operation so far.
    pub fn simulations(&self) -> Vec<OperationGroup> {
        self.state.lock().simulations.clone()
    }

    /// What was wrong with what the stand-in received (empty when all was right).
    pub fn problems(&self) -> Vec<String> {
        self.state.lock().problems.clone()
    }

    /// Every call received (`GET /chains/...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().requests.clone()
    }

    /// Where operation `hash` is in the current chain: (level, applied).
    pub fn included(&self, hash: &str) -> Option<(u64, bool)> {
        let s = self.state.lock();
        s.blocks.iter().find_map(|b| b.ops.iter().find(|o| o.hash == hash).map(|o| (b.level, o.applied)))
    }

    /// Answers every call of `path` with `status` and `body` from now on.
    pub fn override_response(&self, path: &str, status: u16, body: &str) {
        self.state.lock().overrides.insert(path.to_string(), (status, body.to_string()));
    }

    /// Replaces the scripted faults.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().faults = faults;
    }
}

fn recorded_header_field(k: &str) -> String {
    recorded(RECORDED_HEADER).get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn fee_updates(origin: &str, source: &str, fee: u64) -> Value {
    if fee == 0 {
        return json!([]);
    }
    json!([
        {"kind": "contract", "contract": source, "change": format!("-{fee}"), "origin": origin},
        {"kind": "accumulator", "category": "block fees", "change": fee.to_string(), "origin": origin},
    ])
}

fn set_origin(v: &mut Value, origin: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "origin" {
                    *x = json!(origin);
                } else {
                    set_origin(x, origin);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| set_origin(x, origin)),
        _ => {}
    }
}

/// `expr...`: the hash of a packed big_map key.
fn script_expr_hash(key: &Micheline) -> String {
    let mut packed = vec![0x05];
    packed.extend(key.to_bytes().unwrap_or_default());
    let mut raw = vec![13, 44, 64, 27];
    raw.extend(blake2b::digest_256(&packed));
    raw.to_base58check()
}

fn octez_error(id: &str, fields: Value) -> Value {
    let mut e = json!({"kind": "temporary", "id": format!("proto.024-PtTALLiN.{id}")});
    if let (Some(o), Value::Object(f)) = (e.as_object_mut(), fields) {
        o.extend(f);
    }
    e
}

fn script_rejected(contract: &str, with: &str) -> Vec<Value> {
    vec![
        octez_error("michelson_v1.runtime_error", json!({"contract_handle": contract, "contract_code": "Deprecated"})),
        octez_error("michelson_v1.script_rejected", json!({"location": 63, "with": {"string": with}})),
    ]
}

impl StandIn {
    fn head(&self) -> &Block {
        // There is always a block: the first one is made at start and reorgs replace, never
        // remove, blocks.
        self.blocks.last().unwrap_or_else(|| unreachable!("the stand-in chain has blocks"))
    }

    fn block(&self, id: &str) -> Option<&Block> {
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

    fn ctx(&self) -> Ctx {
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
    fn precheck(&self, ctx: &Ctx, group: &OperationGroup) -> Result<(), Vec<Value>> {
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
    fn evaluate(&self, ctx: &Ctx, group: &OperationGroup) -> Vec<Outcome> {
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

    /// A content's metadata for `outcome`, from the recorded responses.
    fn metadata(&self, c: &Content, outcome: &Outcome, origin: &str) -> Value {
        let m = c.manager();
        let src = m.source.to_b58check();
        let mut meta = match (c, outcome) {
            (_, Outcome::Failed(errors)) => {
                let mut meta = self.recorded.failed_meta.clone();
                meta["operation_result"] = json!({"status": "failed", "errors": errors});
                meta
            }
            (Content::Reveal { .. }, _) => self.recorded.reveal_meta.clone(),
            (Content::Transaction { parameters, .. }, _) => {
                let mut meta = self.recorded.tx_meta.clone();
                if let (Some(p), Outcome::Applied { paid, .. }) = (parameters, outcome)
                    && let Ok(a) = AnchorParameter::from_micheline(&p.value)
                {
                    let key = Micheline::Bytes(a.chain.as_bytes().to_vec());
                    let r = &mut meta["operation_result"];
                    r["paid_storage_size_diff"] = json!(paid.to_string());
                    r["balance_updates"] = if *paid == 0 {
                        json!([])
                    } else {
                        let burn = paid * 250;
                        json!([
                            {"kind": "contract", "contract": src, "change": format!("-{burn}"), "origin": origin},
                            {"kind": "burned", "category": "storage fees", "change": burn.to_string(), "origin": origin},
                        ])
                    };
                    r["lazy_storage_diff"][0]["diff"]["updates"] = json!([{
                        "key_hash": script_expr_hash(&key),
                        "key": key.to_json(),
                        "value": {"int": a.tree_size.to_string()},
                    }]);
                    let event = &mut meta["internal_operation_results"][0];
                    event["source"] = json!(self.config.contract);
                    event["payload"] = json!({"prim": "Pair", "args": [
                        key.to_json(), {"int": a.tree_size.to_string()}, {"bytes": hex::encode(a.root)}, {"int": a.height.to_string()},
                    ]});
                }
                meta
            }
        };
        match outcome {
            Outcome::Backtracked { milligas } => {
                meta["operation_result"] = json!({"status": "backtracked", "consumed_milligas": milligas.to_string()});
                if let Some(o) = meta.as_object_mut() {
                    o.remove("internal_operation_results");
                }
            }
            Outcome::Skipped => {
                meta["operation_result"] = json!({"status": "skipped"});
                if let Some(o) = meta.as_object_mut() {
                    o.remove("internal_operation_results");
                }
            }
            Outcome::Applied { milligas, .. } if matches!(c, Content::Reveal { .. }) => {
                meta["operation_result"]["consumed_milligas"] = json!(milligas.to_string());
            }
            _ => {}
        }
        meta["balance_updates"] = fee_updates(origin, &src, m.fee);
        set_origin(&mut meta, origin);
        meta
    }

    fn contents_json(&self, group: &OperationGroup, outcomes: &[Outcome], origin: &str) -> Vec<Value> {
        group
            .contents
            .iter()
            .zip(outcomes)
            .map(|(c, o)| {
                let mut j = c.to_json();
                j["metadata"] = self.metadata(c, o, origin);
                j
            })
            .collect()
    }

    fn new_block_hash(&mut self, level: u64) -> String {
        self.salt += 1;
        let digest = blake2b::digest_256(format!("stand-in block {level} {}", self.salt).as_bytes());
        BlockHash::try_from_bytes(&digest).map(|h| h.to_b58check()).unwrap_or_default()
    }

    fn bake(&mut self) {
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

    fn header_json(&self, b: &Block) -> Value {
        let mut h = recorded(RECORDED_HEADER);
        h["hash"] = json!(b.hash);
        h["level"] = json!(b.level);
        h["predecessor"] = json!(b.predecessor);
        h["fitness"][1] = json!(format!("{:08x}", b.level));
        h
    }

    fn run_operation(&mut self, body: &[u8]) -> (StatusCode, Value) {
        let Ok(req) = serde_json::from_slice::<Value>(body) else {
            self.problems.push("run_operation: the body is not JSON".into());
            return (StatusCode::BAD_REQUEST, json!("Failed to parse the request body"));
        };
        if req.get("chain_id").and_then(Value::as_str) != Some(recorded_header_field("chain_id").as_str()) {
            self.problems.push(format!("run_operation: chain_id {:?}", req.get("chain_id")));
        }
        let Some(op) = req.get("operation") else {
            self.problems.push("run_operation: no operation".into());
            return (StatusCode::BAD_REQUEST, json!("Missing operation"));
        };
        if op.get("signature").and_then(Value::as_str).is_none() {
            self.problems.push("run_operation: no signature".into());
        }
        let group = match OperationGroup::from_json(op) {
            Ok(g) => g,
            Err(e) => {
                self.problems.push(format!("run_operation: {e}"));
                return (StatusCode::BAD_REQUEST, json!(format!("{e}")));
            }
        };
        self.simulations.push(group.clone());
        let ctx = self.ctx();
        if let Err(errors) = self.precheck(&ctx, &group) {
            return (StatusCode::INTERNAL_SERVER_ERROR, Value::Array(errors));
        }
        let outcomes = self.evaluate(&ctx, &group);
        (StatusCode::OK, json!({"contents": self.contents_json(&group, &outcomes, "simulation")}))
    }

    fn inject(&mut self, body: &[u8]) -> (StatusCode, Value) {
        let Ok(Value::String(hex_text)) = serde_json::from_slice::<Value>(body) else {
            self.problems.push("injection: the body is not a JSON string".into());
            return (StatusCode::BAD_REQUEST, json!("Failed to parse the request body"));
        };
        let Ok(bytes) = hex::decode(&hex_text) else {
            self.problems.push("injection: not hex".into());
            return (StatusCode::BAD_REQUEST, json!("Invalid hex"));
        };
        let hash = operation_hash(&bytes).to_b58check();
        let mut record = Injection {
            hash: hash.clone(),
            operation: None,
            accepted: false,
            refusal: None,
            head_level: self.head().level,
        };
        let answer = self.check_injection(&bytes, &hash, &mut record);
        if let Err((status, errors)) = &answer {
            record.refusal = Some(crate::rpc::describe_octez_errors(errors.to_string().as_bytes()));
            self.injections.push(record);
            return (*status, errors.clone());
        }
        record.accepted = true;
        self.injections.push(record);
        (StatusCode::OK, json!(hash))
    }

    fn check_injection(&mut self, bytes: &[u8], hash: &str, record: &mut Injection) -> Result<(), (StatusCode, Value)> {
        let refuse = |id: &str| (StatusCode::INTERNAL_SERVER_ERROR, json!([{"kind": "permanent", "id": id}]));
        let op = match SignedOperation::unforge(bytes) {
            Ok(op) => op,
            Err(e) => {
                self.problems.push(format!("injection {hash}: the bytes do not decode: {e}"));
                return Err(refuse("node.prevalidation.parse_error"));
            }
        };
        record.operation = Some(op.clone());
        let branch = op.group.branch.to_b58check();
        if !self.blocks.iter().any(|b| b.hash == branch) {
            return Err(refuse("prevalidation.unknown_branch"));
        }
        // The signature: by the key revealed for the source, or revealed in the group.
        let ctx = self.ctx();
        let src = op.group.contents[0].manager().source.to_b58check();
        let key = op
            .group
            .contents
            .iter()
            .find_map(|c| match c {
                Content::Reveal { public_key, .. } => Some(public_key.clone()),
                Content::Transaction { .. } => None,
            })
            .or_else(|| ctx.keys.get(&src).cloned());
        match key {
            Some(k) if verify_forged(&k, &op.forged, &op.signature) => {}
            _ => {
                self.problems.push(format!("injection {hash}: the signature does not verify"));
                return Err(refuse("proto.024-PtTALLiN.operation.invalid_signature"));
            }
        }
        // What was simulated is what is injected, up to fees and limits.
        let strip = |g: &OperationGroup| {
            let mut g = g.clone();
            for c in &mut g.contents {
                let m = c.manager_mut();
                (m.fee, m.gas_limit, m.storage_limit) = (0, 0, 0);
            }
            g.branch = op.group.branch.clone();
            g
        };
        if !self.simulations.iter().any(|s| strip(s) == strip(&op.group)) {
            self.problems.push(format!("injection {hash}: its contents were never simulated"));
        }
        // The node's minimal fees, over the whole batch.
        let fee: u64 = op.group.contents.iter().map(|c| c.manager().fee).sum();
        let gas: u64 = op.group.contents.iter().map(|c| c.manager().gas_limit).sum();
        let needed = 100 + bytes.len() as u64 + gas.div_ceil(10);
        if fee < needed {
            self.problems.push(format!("injection {hash}: fees {fee} below the minimal {needed}"));
            return Err(refuse("prefilter.fees_too_low"));
        }
        if let Err(errors) = self.precheck(&ctx, &op.group) {
            return Err((StatusCode::INTERNAL_SERVER_ERROR, Value::Array(errors)));
        }
        let outcomes = self.evaluate(&ctx, &op.group);
        for o in &outcomes {
            if let Outcome::Failed(errors) = o {
                let text = Value::Array(errors.clone()).to_string();
                if text.contains("exhausted") {
                    self.problems.push(format!("injection {hash}: limits too low: {text}"));
                }
            }
        }
        if self
            .mempool
            .iter()
            .any(|(_, p)| p.group.contents[0].manager().source == op.group.contents[0].manager().source)
        {
            let mut e = recorded(RECORDED_ERROR_CONFLICT);
            e[0]["new_hash"] = json!(hash);
            return Err((StatusCode::INTERNAL_SERVER_ERROR, e));
        }
        if self.faults.lose_injections > 0 {
            self.faults.lose_injections -= 1;
            return Ok(());
        }
        self.mempool.push((hash.to_string(), op));
        Ok(())
    }

    fn respond(&mut self, method: &Method, uri: &Uri, body: &[u8]) -> Response {
        let path = uri.path();
        self.requests.push(format!("{method} {path}"));
        if let Some((status, body)) = self.overrides.get(path) {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, [("content-type", "application/json")], body.clone()).into_response();
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (status, v) = match (method.as_str(), parts.as_slice()) {
            ("GET", ["chains", "main", "blocks", id, "header"]) => match self.block(id) {
                Some(b) => (StatusCode::OK, self.header_json(b)),
                None => return StatusCode::NOT_FOUND.into_response(),
            },
            ("GET", ["chains", "main", "blocks", id, "operation_hashes", "3"]) => match self.block(id) {
                Some(b) => {
                    let hashes: Vec<String> = b.ops.iter().map(|o| o.hash.clone()).collect();
                    if !hashes.is_empty() {
                        let block = b.hash.clone();
                        self.seen.insert(block);
                    }
                    (StatusCode::OK, json!(hashes))
                }
                None => return StatusCode::NOT_FOUND.into_response(),
            },
            ("GET", ["chains", "main", "blocks", id, "operations", "3"]) => match self.block(id) {
                Some(b) => (StatusCode::OK, json!(b.ops.iter().map(|o| o.json.clone()).collect::<Vec<_>>())),
                None => return StatusCode::NOT_FOUND.into_response(),
            },
            ("GET", ["chains", "main", "blocks", "head", "context", "constants"]) => {
                (StatusCode::OK, recorded(RECORDED_CONSTANTS))
            }
            ("GET", ["chains", "main", "blocks", "head", "context", "contracts", addr, what]) => {
                let ctx = self.ctx();
                let Some(counter) = ctx.counters.get(*addr) else {
                    return StatusCode::NOT_FOUND.into_response();
                };
                match *what {
                    "counter" => (StatusCode::OK, json!(counter.to_string())),
                    "manager_key" => {
                        (StatusCode::OK, ctx.keys.get(*addr).map_or(Value::Null, |k| json!(k.to_b58check())))
                    }
                    _ => return StatusCode::NOT_FOUND.into_response(),
                }
            }
            ("POST", ["chains", "main", "blocks", "head", "helpers", "scripts", "run_operation"]) => {
                self.run_operation(body)
            }
            ("POST", ["injection", "operation"]) => self.inject(body),
            _ => return StatusCode::NOT_FOUND.into_response(),
        };
        (status, axum::Json(v)).into_response()
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

async fn handle(State(state): State<Arc<Mutex<StandIn>>>, method: Method, uri: Uri, body: Bytes) -> Response {
    state.lock().respond(&method, &uri, &body)
}
