//! Transactions: the address + key data model, validation of client-supplied fields, the
//! canonical versioned binary encoding (documented in `openapi/ENCODING.md`) whose leaf hash
//! is the transaction id, and the Ed25519 device-signature payload.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::merkle::{Hash, leaf_hash};

/// Current canonical encoding version.
pub const TX_VERSION: u8 = 1;
/// Largest body a client may send (bytes).
pub const MAX_BODY: usize = 8 * 1024;
/// Largest address (bytes).
pub const MAX_ADDRESS: usize = 256;
/// Largest key (bytes).
pub const MAX_KEY: usize = 128;
/// Largest device id (bytes).
pub const MAX_DEVICE_ID: usize = 64;
/// Largest idempotency key (bytes).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Most props on one transaction.
pub const MAX_PROPS: usize = 32;
/// Largest prop name (bytes).
pub const MAX_PROP_NAME: usize = 64;
/// Largest prop value (bytes).
pub const MAX_PROP_VALUE: usize = 256;
/// Most bytes of prop names and values together, so that a transaction always fits in a
/// 16 KB block next to an 8 KB body.
pub const MAX_PROPS_BYTES: usize = 4 * 1024;
/// Longest TTL (ten years, in seconds).
pub const MAX_TTL_SECS: u32 = 10 * 365 * 24 * 3600;
/// Domain separator of the device-signature payload.
pub const SIGNING_DOMAIN: &[u8] = b"kalima-tx-sig-v2\0";

/// What a transaction does to `address`/`key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxKind {
    /// Replace the value of the key.
    Put,
    /// Remove the key (empty body).
    Delete,
}

impl TxKind {
    fn code(self) -> u8 {
        match self {
            TxKind::Put => 0,
            TxKind::Delete => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(TxKind::Put),
            1 => Some(TxKind::Delete),
            _ => None,
        }
    }
}

/// Why a client-supplied field is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    /// Name of the offending field as the client sent it.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    /// A field error with its reason.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// Kalima's key character rule: `^[a-z0-9 :.@+_/-]+$`, case-insensitive.
fn key_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | ':' | '.' | '@' | '+' | '_' | '/' | '-')
}

/// Checks a key against Kalima's rule and our length limit.
pub fn validate_key(key: &str) -> Result<(), FieldError> {
    if key.is_empty() {
        return Err(FieldError::new("key", "must not be empty"));
    }
    if key.len() > MAX_KEY {
        return Err(FieldError::new("key", format!("longer than {MAX_KEY} bytes")));
    }
    if let Some(c) = key.chars().find(|c| !key_char_ok(*c)) {
        return Err(FieldError::new(
            "key",
            format!("character {c:?} is not allowed (allowed: a-z 0-9 space : . @ + _ / -)"),
        ));
    }
    Ok(())
}

/// Checks an address: `/`-separated non-empty segments of key characters, e.g. `/plant-1/line-2`.
pub fn validate_address(address: &str) -> Result<(), FieldError> {
    validate_path("address", address, false)
}

/// Checks an address prefix (as in grants and stream filters): an address, or `/` for all.
pub fn validate_prefix(prefix: &str) -> Result<(), FieldError> {
    validate_path("prefix", prefix, true)
}

fn validate_path(field: &'static str, path: &str, allow_root: bool) -> Result<(), FieldError> {
    if path.len() > MAX_ADDRESS {
        return Err(FieldError::new(field, format!("longer than {MAX_ADDRESS} bytes")));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(FieldError::new(field, "must start with '/'"));
    };
    if rest.is_empty() {
        return if allow_root {
            Ok(())
        } else {
            Err(FieldError::new(field, "must name at least one segment, e.g. /plant-1"))
        };
    }
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(FieldError::new(field, "has an empty segment ('//' or a trailing '/')"));
        }
        if let Some(c) = seg.chars().find(|c| *c == '/' || !key_char_ok(*c)) {
            return Err(FieldError::new(field, format!("character {c:?} is not allowed")));
        }
    }
    Ok(())
}

/// True when `address` is `prefix` itself or lies below it on a segment boundary.
pub fn prefix_matches(prefix: &str, address: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match address.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

/// The fields a client chooses; the node adds sequencing fields to make a [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxContent {
    /// Writing device.
    pub device_id: String,
    /// Target address.
    pub address: String,
    /// Target key.
    pub key: String,
    /// Value bytes; empty for a delete.
    pub body: Vec<u8>,
    /// Free string properties (sorted by name in the encoding).
    pub props: BTreeMap<String, String>,
    /// Seconds after which the node deletes the value; 0 for never.
    pub ttl_secs: u32,
    /// Device clock in ms since the Unix epoch, if sent.
    pub client_time_ms: Option<i64>,
    /// Client-chosen key that makes retries safe; empty for none.
    pub idempotency_key: String,
    /// Ed25519 signature over [`TxContent::signing_bytes`].
    pub signature: Option<[u8; 64]>,
}

impl TxContent {
    /// Put when the body is non-empty, delete otherwise (Kalima's rule).
    pub fn kind(&self) -> TxKind {
        if self.body.is_empty() { TxKind::Delete } else { TxKind::Put }
    }

    /// Validates every client-supplied field, naming the first one that is wrong.
    pub fn validate(&self, max_body: usize) -> Result<(), FieldError> {
        validate_address(&self.address)?;
        validate_key(&self.key)?;
        if self.body.len() > max_body {
            return Err(FieldError::new(
                "body",
                format!("{} bytes is over the {max_body}-byte limit", self.body.len()),
            ));
        }
        if self.props.len() > MAX_PROPS {
            return Err(FieldError::new("props", format!("more than {MAX_PROPS} entries")));
        }
        for (k, v) in &self.props {
            if k.is_empty() || k.len() > MAX_PROP_NAME {
                return Err(FieldError::new("props", format!("name {k:?} must be 1..={MAX_PROP_NAME} bytes")));
            }
            if v.len() > MAX_PROP_VALUE {
                return Err(FieldError::new("props", format!("value of {k:?} is over {MAX_PROP_VALUE} bytes")));
            }
        }
        let props_bytes: usize = self.props.iter().map(|(k, v)| k.len() + v.len()).sum();
        if props_bytes > MAX_PROPS_BYTES {
            return Err(FieldError::new(
                "props",
                format!("{props_bytes} bytes of names and values, over {MAX_PROPS_BYTES}"),
            ));
        }
        if self.ttl_secs > MAX_TTL_SECS {
            return Err(FieldError::new("ttl", format!("over {MAX_TTL_SECS} seconds")));
        }
        if self.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(FieldError::new("idempotency_key", format!("longer than {MAX_IDEMPOTENCY_KEY} bytes")));
        }
        if self.device_id.is_empty() || self.device_id.len() > MAX_DEVICE_ID {
            return Err(FieldError::new("device_id", format!("must be 1..={MAX_DEVICE_ID} bytes")));
        }
        Ok(())
    }

    /// The bytes a device signs: domain separator, the chain name (so a signature is valid on
    /// one chain only), then the client fields in canonical form.
    pub fn signing_bytes(&self, chain: &str) -> Vec<u8> {
        let mut w = Writer::with_capacity(SIGNING_DOMAIN.len() + chain.len() + self.body.len() + 128);
        w.raw(SIGNING_DOMAIN);
        w.str16(chain);
        self.write_client_fields(&mut w);
        w.0
    }

    /// Verifies the signature for `chain` against `key`; false when absent or wrong.
    pub fn verify_signature(&self, chain: &str, key: &VerifyingKey) -> bool {
        match &self.signature {
            Some(sig) => key.verify(&self.signing_bytes(chain), &Signature::from_bytes(sig)).is_ok(),
            None => false,
        }
    }

    /// Parses what [`TxContent::write_client_fields`] and the signature flag wrote.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = TxKind::from_code(r.u8()?).ok_or_else(|| DecodeError("unknown kind".into()))?;
        let device_id = r.str16()?;
        let address = r.str16()?;
        let key = r.str16()?;
        let ttl_secs = r.u32()?;
        let client_time_ms = match r.u8()? {
            0 => None,
            1 => Some(r.i64()?),
            f => return Err(DecodeError(format!("bad client time flag {f}"))),
        };
        let n = r.u16()?;
        let mut props = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n {
            let k = r.str16()?;
            let v = r.str16()?;
            // Sorted, unique names are what makes the encoding canonical.
            if last.as_ref().is_some_and(|l| *l >= k) {
                return Err(DecodeError("props not strictly sorted".into()));
            }
            last = Some(k.clone());
            props.insert(k, v);
        }
        let idempotency_key = r.str16()?;
        let body = r.bytes32()?;
        let signature = match r.u8()? {
            0 => None,
            1 => Some(r.array::<64>()?),
            f => return Err(DecodeError(format!("bad signature flag {f}"))),
        };
        let content =
            TxContent { device_id, address, key, body, props, ttl_secs, client_time_ms, idempotency_key, signature };
        if content.kind() != kind {
            return Err(DecodeError("kind does not match body".into()));
        }
        Ok(content)
    }

    fn write_signature(&self, w: &mut Writer) {
        match &self.signature {
            Some(sig) => {
                w.u8(1);
                w.raw(sig);
            }
            None => w.u8(0),
        }
    }

    /// The content alone, in the canonical field encoding (what node links carry).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.body.len() + self.address.len() + self.key.len() + 64);
        self.write_client_fields(&mut w);
        self.write_signature(&mut w);
        w.0
    }

    /// Parses [`TxContent::encode`] output, rejecting trailing data.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let c = TxContent::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    fn write_client_fields(&self, w: &mut Writer) {
        w.u8(self.kind().code());
        w.str16(&self.device_id);
        w.str16(&self.address);
        w.str16(&self.key);
        w.u32(self.ttl_secs);
        match self.client_time_ms {
            Some(t) => {
                w.u8(1);
                w.i64(t);
            }
            None => w.u8(0),
        }
        w.u16(self.props.len() as u16);
        for (k, v) in &self.props {
            w.str16(k);
            w.str16(v);
        }
        w.str16(&self.idempotency_key);
        w.bytes32(&self.body);
    }
}

impl Serialize for TxContent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.encode())
    }
}

impl<'de> Deserialize<'de> for TxContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = TxContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("canonical transaction content bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<TxContent, E> {
                TxContent::decode(v).map_err(E::custom)
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// A sequenced transaction: the client content plus what the node assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Position in the whole chain (0-based, gap-free); also the Merkle leaf index.
    pub global_sequence: u64,
    /// Position among the transactions of this address (1-based, gap-free).
    pub sequence: u64,
    /// Node (leader) time in ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Id of the previous transaction on the same address and key; zero when none.
    pub previous: Hash,
    /// What the client sent.
    pub content: TxContent,
}

impl Transaction {
    /// Canonical bytes (version 1); see `openapi/ENCODING.md`.
    pub fn encode(&self) -> Vec<u8> {
        let c = &self.content;
        let mut w = Writer::with_capacity(c.body.len() + c.address.len() + c.key.len() + 128);
        w.u8(TX_VERSION);
        w.u64(self.global_sequence);
        w.u64(self.sequence);
        w.i64(self.timestamp_ms);
        w.raw(&self.previous);
        c.write_client_fields(&mut w);
        c.write_signature(&mut w);
        w.0
    }

    /// Parses canonical bytes, rejecting trailing data and unknown versions.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != TX_VERSION {
            return Err(DecodeError(format!("unknown transaction version {version}")));
        }
        let global_sequence = r.u64()?;
        let sequence = r.u64()?;
        let timestamp_ms = r.i64()?;
        let previous = r.array::<32>()?;
        let content = TxContent::read(&mut r)?;
        r.finish()?;
        Ok(Transaction { global_sequence, sequence, timestamp_ms, previous, content })
    }

    /// The transaction id: its RFC 6962 leaf hash.
    pub fn id(&self) -> Hash {
        leaf_hash(&self.encode())
    }

    /// When the node must delete this value, if it has a TTL and is a put.
    pub fn expires_at_ms(&self) -> Option<i64> {
        (self.content.ttl_secs > 0 && self.content.kind() == TxKind::Put)
            .then(|| self.timestamp_ms.saturating_add(i64::from(self.content.ttl_secs) * 1000))
    }
}

/// Canonical bytes that do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed encoding: {0}")]
pub struct DecodeError(pub String);

/// Big-endian writer shared by the canonical encodings.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.raw(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.raw(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.raw(&v.to_be_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.raw(&v.to_be_bytes());
    }
    /// Strings are bounded well below 64 KiB by validation.
    pub(crate) fn str16(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.raw(s.as_bytes());
    }
    pub(crate) fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
}

/// Bounds-checked big-endian reader.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| DecodeError(format!("truncated at byte {}", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    pub(crate) fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string is not UTF-8".into()))
    }
    pub(crate) fn bytes32(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::*;

    fn sample() -> Transaction {
        Transaction {
            global_sequence: 7,
            sequence: 3,
            timestamp_ms: 1_763_700_000_000,
            previous: [9; 32],
            content: TxContent {
                device_id: "sensor-1".into(),
                address: "/plant-1/line-2".into(),
                key: "temp".into(),
                body: b"21.5".to_vec(),
                props: [("unit".to_string(), "C".to_string())].into(),
                ttl_secs: 60,
                client_time_ms: Some(1_763_699_999_000),
                idempotency_key: "abc".into(),
                signature: None,
            },
        }
    }

    #[test]
    fn key_rule_matches_kalima() {
        for ok in ["temp", "Temp", "a b", "x:y.z@w+v_u/t-s", "0"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "é", "a#b", "a?b", "tab\t", &"k".repeat(MAX_KEY + 1)] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn address_rules() {
        for ok in ["/a", "/plant-1/line-2", "/x/y/z"] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "/", "//a", "/a/", "/a//b", "/a?b"] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
        assert!(validate_prefix("/").is_ok());
    }

    #[test]
    fn prefix_matching_respects_segments() {
        assert!(prefix_matches("/", "/a"));
        assert!(prefix_matches("/plant-1", "/plant-1"));
        assert!(prefix_matches("/plant-1", "/plant-1/line"));
        assert!(!prefix_matches("/plant-1", "/plant-10"));
        assert!(!prefix_matches("/plant-1/line", "/plant-1"));
    }

    #[test]
    fn decode_rejects_trailing_and_truncated() {
        let bytes = sample().encode();
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Transaction::decode(&longer).is_err());
        for n in 0..bytes.len() {
            assert!(Transaction::decode(&bytes[..n]).is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn the_largest_valid_transaction_fits_in_one_block() {
        let props = (0..MAX_PROPS)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = MAX_PROP_NAME),
                    "v".repeat(MAX_PROPS_BYTES / MAX_PROPS - MAX_PROP_NAME),
                )
            })
            .collect();
        let content = TxContent {
            device_id: "d".repeat(MAX_DEVICE_ID),
            address: format!("/{}", "a".repeat(MAX_ADDRESS - 1)),
            key: "k".repeat(MAX_KEY),
            body: vec![7; MAX_BODY],
            props,
            ttl_secs: MAX_TTL_SECS,
            client_time_ms: Some(i64::MAX),
            idempotency_key: "i".repeat(MAX_IDEMPOTENCY_KEY),
            signature: Some([1; 64]),
        };
        content.validate(MAX_BODY).unwrap();
        let tx = Transaction {
            global_sequence: u64::MAX,
            sequence: u64::MAX,
            timestamp_ms: i64::MAX,
            previous: [0; 32],
            content,
        };
        assert!(tx.encode().len() <= crate::block::MAX_BLOCK_TX_BYTES, "{} bytes", tx.encode().len());
        let mut over = tx.content.clone();
        over.props.insert("z".into(), "x".repeat(MAX_PROP_VALUE));
        assert!(over.validate(MAX_BODY).is_err(), "props over the byte budget must be refused");
    }

    #[test]
    fn signature_binds_content() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let mut c = sample().content;
        c.signature = Some(sk.sign(&c.signing_bytes("plant")).to_bytes());
        assert!(c.verify_signature("plant", &sk.verifying_key()));
        assert!(!c.verify_signature("other-chain", &sk.verifying_key()), "a signature is bound to its chain");
        c.body = b"99".to_vec();
        assert!(!c.verify_signature("plant", &sk.verifying_key()));
    }

    fn arb_tx() -> impl Strategy<Value = Transaction> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
            any::<[u8; 32]>(),
            "[a-z0-9]{1,10}",
            "(/[a-z0-9]{1,8}){1,4}",
            "[a-z0-9 :.@+_/-]{1,20}",
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,20}", 0..5),
            (any::<u32>(), proptest::option::of(any::<i64>()), "[a-z0-9]{0,12}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 64..=64)),
        )
            .prop_map(|(g, s, t, p, d, a, k, body, props, (ttl, ct, idem), sig)| Transaction {
                global_sequence: g,
                sequence: s,
                timestamp_ms: t,
                previous: p,
                content: TxContent {
                    device_id: d,
                    address: a,
                    key: k,
                    body,
                    props,
                    ttl_secs: ttl,
                    client_time_ms: ct,
                    idempotency_key: idem,
                    signature: sig.map(|v| {
                        let mut a = [0u8; 64];
                        a.copy_from_slice(&v);
                        a
                    }),
                },
            })
    }

    proptest! {
        #[test]
        fn encoding_round_trips(tx in arb_tx()) {
            let bytes = tx.encode();
            prop_assert_eq!(Transaction::decode(&bytes).unwrap(), tx);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Transaction::decode(&bytes);
        }

        #[test]
        fn distinct_transactions_have_distinct_bytes(a in arb_tx(), b in arb_tx()) {
            prop_assume!(a != b);
            prop_assert_ne!(a.encode(), b.encode());
        }
    }
}
