//! The RPC the stand-in serves: the Octez calls this crate makes (block headers, operation hashes
//! and operations of a block, constants, counters and manager keys, `run_operation`, injection),
//! overridden answers, the request log, and the checks of what is simulated and injected.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tezos_crypto_rs::hash::HashTrait;

use super::Injection;
use super::chain::{Outcome, StandIn};
use super::recorded::{RECORDED_CONSTANTS, RECORDED_ERROR_CONFLICT, recorded, recorded_header_field};
use crate::forge::{Content, OperationGroup, SignedOperation, operation_hash};
use crate::keys::verify_forged;

impl StandIn {
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

pub(super) async fn handle(
    State(state): State<Arc<Mutex<StandIn>>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    state.lock().respond(&method, &uri, &body)
}
