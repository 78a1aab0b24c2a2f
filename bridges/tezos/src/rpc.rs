//! A small client of the Octez node RPC (reqwest + serde): block headers, an account's
//! counter and manager key, protocol constants, the simulation of an operation
//! (`helpers/scripts/run_operation`), its injection, and the operations of a block.
//!
//! Every answer is outside input: sizes are capped, shapes are checked, and a malformed
//! answer is an error that names the call and shows the start of the body.

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::forge::short;

/// Largest RPC answer read (a block's manager operations fit well below).
const MAX_BODY_BYTES: usize = 32 << 20;

/// A block header, as `GET /chains/main/blocks/{id}/header` returns it (the fields used).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockHeader {
    /// Block hash (`B...`).
    pub hash: String,
    /// Level.
    #[serde(deserialize_with = "u64_of_json")]
    pub level: u64,
    /// Chain id (`NetX...`).
    pub chain_id: String,
    /// Protocol hash (`Pt...`).
    pub protocol: String,
    /// Predecessor's hash.
    #[serde(default)]
    pub predecessor: String,
    /// Timestamp (RFC 3339).
    #[serde(default)]
    pub timestamp: String,
}

/// The protocol constants used to simulate (from `.../context/constants`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Constants {
    /// Most gas units one operation may use.
    #[serde(deserialize_with = "u64_of_json")]
    pub hard_gas_limit_per_operation: u64,
    /// Most gas units a block may hold.
    #[serde(deserialize_with = "u64_of_json")]
    pub hard_gas_limit_per_block: u64,
    /// Most storage bytes one operation may pay for.
    #[serde(deserialize_with = "u64_of_json")]
    pub hard_storage_limit_per_operation: u64,
    /// Mutez burnt per byte of storage.
    #[serde(deserialize_with = "u64_of_json")]
    pub cost_per_byte: u64,
}

/// What the simulation says of one content of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedContent {
    /// `reveal`, `transaction`...
    pub kind: String,
    /// `applied`, `failed`, `backtracked` or `skipped`; the worst of the content and its
    /// internal operations (events).
    pub status: String,
    /// Gas used by the content and its internal operations, in milligas.
    pub consumed_milligas: u64,
    /// New storage paid for, in bytes.
    pub paid_storage_size_diff: u64,
    /// The errors reported, as Octez returns them.
    pub errors: Vec<Value>,
}

/// Accepts a JSON number or a decimal string (Octez writes 64-bit values as strings).
pub(crate) fn u64_of_json<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    value_u64(&v).ok_or_else(|| serde::de::Error::custom(format!("expected a natural number, got {}", short(&v))))
}

/// A natural number written as a JSON number or a decimal string.
pub(crate) fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The text of an error and its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Octez's JSON error list (`[{"kind": ..., "id": ..., ...}]`) in one line; any other body
/// as its first characters.
pub fn describe_octez_errors(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(errors)) if !errors.is_empty() => {
            errors.iter().map(describe_octez_error).collect::<Vec<_>>().join("; ")
        }
        Ok(v) => short(&v),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() { "(empty body)".into() } else { text.chars().take(200).collect() }
        }
    }
}

/// One Octez error: its id, then its other fields (a FAILWITH value as Michelson-like text).
pub fn describe_octez_error(e: &Value) -> String {
    let Some(o) = e.as_object() else { return short(e) };
    let id = o.get("id").and_then(Value::as_str).unwrap_or("unknown error");
    let mut parts = Vec::new();
    for (k, v) in o {
        if k == "id" || k == "kind" {
            continue;
        }
        let v =
            if k == "with" { michelson_text(v) } else { v.as_str().map(str::to_string).unwrap_or_else(|| short(v)) };
        parts.push(format!("{k} {v}"));
    }
    if id.ends_with("script_rejected") {
        let with = o.get("with").map(michelson_text).unwrap_or_default();
        return format!("FAILWITH {with} ({id})");
    }
    if parts.is_empty() { id.to_string() } else { format!("{id} ({})", parts.join(", ")) }
}

/// A Micheline JSON value as short Michelson text (`"NOT_ADMIN"`, `42`, `0x00`, `(Pair 1 2)`).
pub fn michelson_text(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            if let Some(s) = o.get("string").and_then(Value::as_str) {
                format!("{s:?}")
            } else if let Some(i) = o.get("int").and_then(Value::as_str) {
                i.to_string()
            } else if let Some(b) = o.get("bytes").and_then(Value::as_str) {
                format!("0x{b}")
            } else if let Some(p) = o.get("prim").and_then(Value::as_str) {
                match o.get("args").and_then(Value::as_array) {
                    Some(args) if !args.is_empty() => {
                        format!("({p} {})", args.iter().map(michelson_text).collect::<Vec<_>>().join(" "))
                    }
                    _ => p.to_string(),
                }
            } else {
                short(v)
            }
        }
        Value::Array(items) => format!("{{ {} }}", items.iter().map(michelson_text).collect::<Vec<_>>().join(" ; ")),
        _ => short(v),
    }
}

/// Reads a `contents` list with metadata (a `run_operation` answer or an operation of a block).
pub fn content_results(contents: &[Value]) -> Result<Vec<SimulatedContent>> {
    contents
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let bad = |m: &str| Error::encoding(format!("contents[{i}]: {m}: {}", short(c)));
            let kind = c.get("kind").and_then(Value::as_str).ok_or_else(|| bad("no kind"))?;
            let result = c.pointer("/metadata/operation_result").ok_or_else(|| bad("no metadata.operation_result"))?;
            let mut r = one_result(kind, result).map_err(|m| bad(&m))?;
            if let Some(internals) = c.pointer("/metadata/internal_operation_results") {
                let internals = internals.as_array().ok_or_else(|| bad("internal_operation_results is not a list"))?;
                for (j, internal) in internals.iter().enumerate() {
                    let ikind = internal.get("kind").and_then(Value::as_str).unwrap_or("internal");
                    let ir = internal
                        .get("result")
                        .ok_or_else(|| bad(&format!("internal_operation_results[{j}] has no result")))?;
                    let ir = one_result(ikind, ir).map_err(|m| bad(&m))?;
                    r.consumed_milligas = r.consumed_milligas.saturating_add(ir.consumed_milligas);
                    r.paid_storage_size_diff = r.paid_storage_size_diff.saturating_add(ir.paid_storage_size_diff);
                    if ir.status != "applied" && r.status == "applied" {
                        r.status = ir.status.clone();
                    }
                    r.errors.extend(ir.errors);
                }
            }
            Ok(r)
        })
        .collect()
}

fn one_result(kind: &str, result: &Value) -> std::result::Result<SimulatedContent, String> {
    let status = result.get("status").and_then(Value::as_str).ok_or("no status")?.to_string();
    let num = |k: &str| -> std::result::Result<u64, String> {
        match result.get(k) {
            None => Ok(0),
            Some(v) => value_u64(v).ok_or_else(|| format!("{k} is not a natural number")),
        }
    };
    let errors = match result.get("errors") {
        None => Vec::new(),
        Some(Value::Array(e)) => e.clone(),
        Some(_) => return Err("errors is not a list".into()),
    };
    Ok(SimulatedContent {
        kind: kind.to_string(),
        consumed_milligas: num("consumed_milligas")?,
        paid_storage_size_diff: num("paid_storage_size_diff")?,
        status,
        errors,
    })
}

/// A client of one Octez node's RPC.
#[derive(Debug, Clone)]
pub struct OctezRpc {
    http: reqwest::Client,
    base: String,
}

impl OctezRpc {
    /// A client of the node at `rpc_url` (`http://127.0.0.1:8732`).
    pub fn new(rpc_url: &str) -> Result<Self> {
        let url = reqwest::Url::parse(rpc_url).map_err(|e| Error::Config(format!("rpc_url {rpc_url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Config(format!("rpc_url {rpc_url:?}: not an http(s) URL")));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {}", chain(&e))))?;
        Ok(Self { http, base: rpc_url.trim_end_matches('/').to_string() })
    }

    /// The node's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    async fn call(&self, what: &str, req: reqwest::RequestBuilder) -> Result<(reqwest::StatusCode, Vec<u8>)> {
        let mut resp = req.send().await.map_err(|e| Error::rpc(what, chain(&e)))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| Error::rpc(what, chain(&e)))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(Error::rpc(what, format!("answer larger than {MAX_BODY_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    fn decode<T: DeserializeOwned>(what: &str, status: reqwest::StatusCode, body: &[u8]) -> Result<T> {
        if !status.is_success() {
            return Err(Error::rpc(what, format!("HTTP {status}: {}", describe_octez_errors(body))));
        }
        serde_json::from_slice(body).map_err(|e| {
            let text = String::from_utf8_lossy(body);
            let start: String = text.chars().take(160).collect();
            Error::rpc(what, format!("malformed answer ({e}): {start:?}"))
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let what = format!("GET {path}");
        let (status, body) = self.call(&what, self.http.get(format!("{}{path}", self.base))).await?;
        Self::decode(&what, status, &body)
    }

    /// The header of block `block` (`head`, `head~2`, a level or a hash).
    pub async fn header(&self, block: &str) -> Result<BlockHeader> {
        self.get(&format!("/chains/main/blocks/{block}/header")).await
    }

    /// The counter of account `address` at the head. An account that was never funded has
    /// none: the error says to fund it.
    pub async fn counter(&self, address: &str) -> Result<u64> {
        let path = format!("/chains/main/blocks/head/context/contracts/{address}/counter");
        let what = format!("GET {path}");
        let (status, body) = self.call(&what, self.http.get(format!("{}{path}", self.base))).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Error::rpc(
                what,
                format!("the account {address} does not exist on this chain: send it some tez first"),
            ));
        }
        let v: Value = Self::decode(&what, status, &body)?;
        value_u64(&v).ok_or_else(|| Error::rpc(what, format!("malformed answer: the counter is {}", short(&v))))
    }

    /// The public key revealed for `address` (`edpk...`), or `None` when not revealed yet.
    pub async fn manager_key(&self, address: &str) -> Result<Option<String>> {
        let path = format!("/chains/main/blocks/head/context/contracts/{address}/manager_key");
        let v: Value = self.get(&path).await?;
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Err(Error::rpc(format!("GET {path}"), format!("malformed answer: {}", short(&other)))),
        }
    }

    /// The head's protocol constants (the fields used).
    pub async fn constants(&self) -> Result<Constants> {
        self.get("/chains/main/blocks/head/context/constants").await
    }

    /// Simulates `operation` (`{branch, contents, signature}`) on top of the head; returns
    /// what happened to each content.
    pub async fn run_operation(&self, operation: &Value, chain_id: &str) -> Result<Vec<SimulatedContent>> {
        let path = "/chains/main/blocks/head/helpers/scripts/run_operation";
        let what = format!("POST {path}");
        let body = json!({ "operation": operation, "chain_id": chain_id });
        let (status, bytes) = self.call(&what, self.http.post(format!("{}{path}", self.base)).json(&body)).await?;
        if !status.is_success() {
            // The protocol refused the operation before running it (counter, balance...).
            return Err(Error::Simulation(describe_octez_errors(&bytes)));
        }
        let v: Value = Self::decode(&what, status, &bytes)?;
        let contents = v
            .get("contents")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::rpc(&what, format!("malformed answer: no contents list: {}", short(&v))))?;
        let n = operation.get("contents").and_then(Value::as_array).map_or(0, Vec::len);
        if contents.len() != n {
            return Err(Error::rpc(&what, format!("{} results for {n} contents", contents.len())));
        }
        content_results(contents).map_err(|e| Error::rpc(&what, e))
    }

    /// Injects a signed operation (hex); returns the hash the node gives it.
    pub async fn inject(&self, signed_hex: &str) -> Result<String> {
        let path = "/injection/operation?chain=main";
        let what = format!("POST {path}");
        let req = self.http.post(format!("{}{path}", self.base)).json(&signed_hex);
        let (status, body) = self.call(&what, req).await?;
        if !status.is_success() {
            return Err(Error::Injection(format!("HTTP {status}: {}", describe_octez_errors(&body))));
        }
        let hash: String = Self::decode(&what, status, &body)?;
        Ok(hash)
    }

    /// The hashes of the manager operations (validation pass 3) of block `level`.
    pub async fn manager_operation_hashes(&self, level: u64) -> Result<Vec<String>> {
        self.get(&format!("/chains/main/blocks/{level}/operation_hashes/3")).await
    }

    /// The manager operations (validation pass 3) of block `level`, with their receipts.
    pub async fn manager_operations(&self, level: u64) -> Result<Vec<Value>> {
        self.get(&format!("/chains/main/blocks/{level}/operations/3")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octez_errors_read_as_one_line() {
        let body = br#"[{"kind":"temporary","id":"proto.024-PtTALLiN.michelson_v1.runtime_error","contract_handle":"KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi","contract_code":"Deprecated"},{"kind":"temporary","id":"proto.024-PtTALLiN.michelson_v1.script_rejected","location":52,"with":{"string":"TREE_SIZE_NOT_NEWER"}}]"#;
        let text = describe_octez_errors(body);
        assert!(text.contains("FAILWITH \"TREE_SIZE_NOT_NEWER\""), "{text}");
        assert!(text.contains("runtime_error"), "{text}");
        assert_eq!(describe_octez_errors(b""), "(empty body)");
        assert_eq!(describe_octez_errors(b"Not found"), "Not found");
    }

    #[test]
    fn numbers_as_strings_or_numbers() {
        assert_eq!(value_u64(&json!("1040000")), Some(1_040_000));
        assert_eq!(value_u64(&json!(12)), Some(12));
        assert_eq!(value_u64(&json!(-1)), None);
        assert_eq!(value_u64(&json!("x")), None);
    }
}
