//! The recorded Octez responses (protocol Tallinn) the stand-in answers from, and the answers
//! built on them: block headers, operation contents with their metadata (results, balance
//! updates, the anchor's storage diff and event) and Octez errors.

use serde_json::{Value, json};
use tezos_crypto_rs::base58::ToBase58Check;
use tezos_crypto_rs::blake2b;
use tezos_crypto_rs::hash::HashTrait;

use super::chain::{Block, Outcome, StandIn};
use crate::contract::AnchorParameter;
use crate::forge::{Content, Micheline, OperationGroup};

/// A recorded block header (Tallinn).
pub const RECORDED_HEADER: &str = include_str!("../../tests/it/octez/header.json");
/// Recorded protocol constants (Tallinn, abridged).
pub const RECORDED_CONSTANTS: &str = include_str!("../../tests/it/octez/constants.json");
/// A recorded `run_operation` answer: a reveal and the first anchor of a chain, applied.
pub const RECORDED_RUN_REVEAL_AND_ANCHOR: &str =
    include_str!("../../tests/it/octez/run_operation_reveal_and_anchor.json");
/// A recorded `run_operation` answer: an anchor refused by the contract (FAILWITH).
pub const RECORDED_RUN_FAILWITH: &str = include_str!("../../tests/it/octez/run_operation_anchor_failwith.json");
/// Recorded manager operations of a block: a tez transfer, then an applied anchor.
pub const RECORDED_OPERATIONS_ANCHOR: &str = include_str!("../../tests/it/octez/operations_3_anchor.json");
/// Recorded manager operations of a block: a refused anchor, then a call of another contract.
pub const RECORDED_OPERATIONS_REFUSED_AND_FOREIGN: &str =
    include_str!("../../tests/it/octez/operations_3_refused_and_foreign.json");
/// A recorded error: the counter is in the past.
pub const RECORDED_ERROR_COUNTER_IN_THE_PAST: &str =
    include_str!("../../tests/it/octez/error_counter_in_the_past.json");
/// A recorded error: the mempool holds a conflicting operation of the same manager.
pub const RECORDED_ERROR_CONFLICT: &str = include_str!("../../tests/it/octez/error_operation_conflict.json");

/// The account of the recorded responses (`TezosKey::from_seed([7; 32])`).
pub const RECORDED_ADMIN: &str = "tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL";
/// The anchoring contract of the recorded responses.
pub const RECORDED_CONTRACT: &str = "KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi";

pub(super) fn recorded(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| unreachable!("a recorded Octez response is JSON: {e}"))
}

pub(super) struct Recorded {
    pub(super) reveal_meta: Value,
    pub(super) tx_meta: Value,
    pub(super) failed_meta: Value,
    pub(super) reveal_milligas: u64,
    pub(super) tx_milligas: u64,
    pub(super) event_milligas: u64,
    pub(super) first_paid: u64,
}

impl Recorded {
    /// What the answers take from the recorded `run_operation` answers: metadata and costs.
    pub(super) fn load() -> Self {
        let run = recorded(RECORDED_RUN_REVEAL_AND_ANCHOR);
        let failed = recorded(RECORDED_RUN_FAILWITH);
        let milligas = |v: &Value, p: &str| v.pointer(p).and_then(crate::rpc::value_u64).unwrap_or(0);
        Recorded {
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
        }
    }
}

pub(super) fn recorded_header_field(k: &str) -> String {
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

pub(super) fn octez_error(id: &str, fields: Value) -> Value {
    let mut e = json!({"kind": "temporary", "id": format!("proto.024-PtTALLiN.{id}")});
    if let (Some(o), Value::Object(f)) = (e.as_object_mut(), fields) {
        o.extend(f);
    }
    e
}

pub(super) fn script_rejected(contract: &str, with: &str) -> Vec<Value> {
    vec![
        octez_error("michelson_v1.runtime_error", json!({"contract_handle": contract, "contract_code": "Deprecated"})),
        octez_error("michelson_v1.script_rejected", json!({"location": 63, "with": {"string": with}})),
    ]
}

impl StandIn {
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

    pub(super) fn contents_json(&self, group: &OperationGroup, outcomes: &[Outcome], origin: &str) -> Vec<Value> {
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

    pub(super) fn header_json(&self, b: &Block) -> Value {
        let mut h = recorded(RECORDED_HEADER);
        h["hash"] = json!(b.hash);
        h["level"] = json!(b.level);
        h["predecessor"] = json!(b.predecessor);
        h["fitness"][1] = json!(format!("{:08x}", b.level));
        h
    }
}
