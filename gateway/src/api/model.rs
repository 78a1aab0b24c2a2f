//! JSON shapes shared by the REST resources.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kalima_core::CommittedTx;
use kalima_core::Rejection;
use kalima_core::tx::{FieldError, TxContent, TxKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A committed transaction.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TxJson {
    /// Transaction id: hex SHA-256 leaf hash of the canonical bytes.
    pub id: String,
    /// Position in the chain (0-based, gap-free); the Merkle leaf index.
    pub global_sequence: u64,
    /// Position among the transactions of this address (1-based).
    pub sequence: u64,
    /// Height of the block holding it.
    pub height: u64,
    /// Node time of the commit (ms since the Unix epoch).
    pub timestamp_ms: i64,
    /// Writing device.
    pub device_id: String,
    /// Address.
    pub address: String,
    /// Key.
    pub key: String,
    /// `put` or `delete`.
    #[schema(value_type = String, example = "put")]
    pub kind: TxKind,
    /// The body parsed as JSON, when it is JSON.
    pub body: Option<serde_json::Value>,
    /// The body bytes, base64.
    pub body_b64: String,
    /// String properties.
    pub props: BTreeMap<String, String>,
    /// TTL in seconds (0: none).
    pub ttl: u32,
    /// Device clock, if sent.
    pub client_time_ms: Option<i64>,
    /// Id of the previous transaction on the same address and key (zeros: none).
    pub previous: String,
    /// Idempotency key, if sent.
    pub idempotency_key: Option<String>,
    /// Device signature (hex), if sent.
    pub signature: Option<String>,
}

impl From<&CommittedTx> for TxJson {
    fn from(c: &CommittedTx) -> Self {
        let t = &c.tx;
        let ct = &t.content;
        TxJson {
            id: hex::encode(c.id),
            global_sequence: t.global_sequence,
            sequence: t.sequence,
            height: c.height,
            timestamp_ms: t.timestamp_ms,
            device_id: ct.device_id.clone(),
            address: ct.address.clone(),
            key: ct.key.clone(),
            kind: ct.kind(),
            body: if ct.body.is_empty() { None } else { serde_json::from_slice(&ct.body).ok() },
            body_b64: B64.encode(&ct.body),
            props: ct.props.clone(),
            ttl: ct.ttl_secs,
            client_time_ms: ct.client_time_ms,
            previous: hex::encode(t.previous),
            idempotency_key: (!ct.idempotency_key.is_empty()).then(|| ct.idempotency_key.clone()),
            signature: ct.signature.map(hex::encode),
        }
    }
}

/// A write: `body` (any JSON, stored as its compact JSON text) or `body_b64` (raw bytes);
/// neither, or an empty body, deletes the key.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TxRequest {
    /// Target address, e.g. `/plant-1/line-2`.
    #[schema(pattern = "^(/[A-Za-z0-9 :.@+_-]+)+$", max_length = 256)]
    pub address: String,
    /// Target key, e.g. `temp` (Kalima's rule `^[a-z0-9 :.@+_/-]+$`, case-insensitive).
    #[schema(pattern = "^[A-Za-z0-9 :.@+_/-]+$", min_length = 1, max_length = 128)]
    pub key: String,
    /// Value as JSON.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Value as base64 bytes (use this when signing: the signature covers exact bytes).
    #[serde(default)]
    pub body_b64: Option<String>,
    /// Seconds after which the node deletes the value (at most ten years).
    #[serde(default)]
    #[schema(maximum = 315360000)]
    pub ttl: Option<u32>,
    /// String properties.
    #[serde(default)]
    pub props: BTreeMap<String, String>,
    /// Device clock (ms since the Unix epoch).
    #[serde(default)]
    pub client_time_ms: Option<i64>,
    /// Makes retries safe: a second write with the same key from the same device is refused (409).
    #[serde(default)]
    #[schema(max_length = 128)]
    pub idempotency_key: Option<String>,
    /// Ed25519 signature (hex) over the signing bytes of `openapi/ENCODING.md` (they include
    /// the chain name); a signed write must also carry an `idempotency_key`.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-fA-F]{128}$")]
    pub signature: Option<String>,
}

impl TxRequest {
    /// The core content (device id is filled by ingest from the authenticated device).
    pub fn into_content(self, device_id: &str) -> Result<TxContent, Rejection> {
        let body = match (self.body, self.body_b64) {
            (Some(_), Some(_)) => {
                return Err(Rejection::Malformed("send either body or body_b64, not both".into()));
            }
            (Some(serde_json::Value::Null), None) | (None, None) => Vec::new(),
            (Some(v), None) => serde_json::to_vec(&v).map_err(|e| Rejection::Malformed(e.to_string()))?,
            (None, Some(b)) => {
                B64.decode(b.as_bytes()).map_err(|e| FieldError::new("body_b64", format!("not base64: {e}")))?
            }
        };
        let signature = match self.signature {
            None => None,
            Some(h) => {
                let mut s = [0u8; 64];
                hex::decode_to_slice(&h, &mut s).map_err(|_| FieldError::new("signature", "must be 128 hex digits"))?;
                Some(s)
            }
        };
        Ok(TxContent {
            device_id: device_id.to_string(),
            address: self.address,
            key: self.key,
            body,
            props: self.props,
            ttl_secs: self.ttl.unwrap_or(0),
            client_time_ms: self.client_time_ms,
            idempotency_key: self.idempotency_key.unwrap_or_default(),
            signature,
        })
    }
}

/// Where a write landed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TxReceipt {
    /// Transaction id (hex).
    pub id: String,
    /// Global sequence.
    pub global_sequence: u64,
    /// Per-address sequence.
    pub sequence: u64,
    /// Block height.
    pub height: u64,
}

impl From<&kalima_core::Receipt> for TxReceipt {
    fn from(r: &kalima_core::Receipt) -> Self {
        TxReceipt { id: hex::encode(r.id), global_sequence: r.global_sequence, sequence: r.sequence, height: r.height }
    }
}

/// Answer to a write with `?wait=false`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Accepted {
    /// Always `accepted`: checked and queued, not yet durable.
    pub status: String,
    /// Transactions queued.
    pub count: usize,
}

/// `?wait=` on writes.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitParam {
    /// `true` (default): answer after the durable commit. `false`: answer 202 once the write
    /// passed every check and is queued; it is not durable yet, and it is not stored if the
    /// node dies first, the commit fails, or a check made at commit time refuses it (a
    /// revoked device, a grant removed meanwhile, an idempotency key used meanwhile). Those
    /// refusals are counted under `interface="queued"`.
    #[serde(default)]
    pub wait: Option<bool>,
}

/// Largest page of any listing.
pub const MAX_PAGE: u32 = 1000;

/// A page size from `?limit=`: `default` when absent, refused outside 1..=1000.
pub fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, super::error::ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(super::error::ApiError::BadRequest("invalid_query", format!("limit must be 1..={MAX_PAGE}")))
    }
}
