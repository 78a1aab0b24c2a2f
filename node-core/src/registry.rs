//! Devices and grants. They live on the chain as ordinary transactions under the reserved
//! address prefix `/_kalima` (so their audit trail is immutable); this module keeps the
//! in-memory view derived from those values and answers "who is this token" and "may this
//! device read/write that address".

use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Rejection;
use crate::memcache::Memcache;
use crate::store::CommittedTx;
use crate::tx::{FieldError, TxContent, TxKind, prefix_matches, validate_prefix};

/// Prefix of every system address; only the node and the admin API write below it.
pub const SYSTEM_PREFIX: &str = "/_kalima";
/// Address whose `genesis` value records the chain name and the node that created it.
pub const CHAIN_ADDRESS: &str = "/_kalima/chain";
/// Address holding one value per device (key = device id).
pub const DEVICES_ADDRESS: &str = "/_kalima/devices";
/// Id of the admin device created by `kalima init`.
pub const ADMIN_ID: &str = "admin";
/// Device id the node uses for the deletes it issues itself (TTL expiry).
pub const NODE_DEVICE_ID: &str = "_node";

/// Address holding the grants of `device` (key = prefix).
pub fn grants_address(device: &str) -> String {
    format!("{SYSTEM_PREFIX}/grants/{device}")
}

/// True for addresses under the reserved system prefix.
pub fn is_system_address(address: &str) -> bool {
    prefix_matches(SYSTEM_PREFIX, address)
}

/// Device record as stored on the chain (JSON body of `/_kalima/devices` values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// SHA-256 (hex) of the device's API token; the token itself is never stored.
    pub token_sha256: String,
    /// Ed25519 public key (hex) when the device signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// When true, unsigned writes are rejected.
    #[serde(default)]
    pub require_signature: bool,
    /// Admin devices may call the admin API and read/write everything outside `/_kalima`.
    #[serde(default)]
    pub admin: bool,
    /// Revoked devices are refused everywhere; the id cannot be reused.
    #[serde(default)]
    pub revoked: bool,
}

/// Grant record as stored on the chain (JSON body of `/_kalima/grants/<device>` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// May read (values, history, streams) under the prefix.
    pub read: bool,
    /// May write under the prefix.
    pub write: bool,
}

/// One grant of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Address prefix (`/` for all).
    pub prefix: String,
    /// Read access.
    pub read: bool,
    /// Write access.
    pub write: bool,
}

/// A registered device as the API sees it.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its id.
    pub id: String,
    /// Its chain record.
    pub record: DeviceRecord,
    /// Parsed public key.
    pub public_key: Option<VerifyingKey>,
    /// Its grants.
    pub grants: Vec<Grant>,
}

impl Device {
    /// True for the admin device(s).
    pub fn is_admin(&self) -> bool {
        self.record.admin
    }

    /// May this device read `address`?
    pub fn can_read(&self, address: &str) -> bool {
        if is_system_address(address) {
            return self.is_admin();
        }
        self.is_admin() || self.grants.iter().any(|g| g.read && prefix_matches(&g.prefix, address))
    }

    /// May this device write `address`? Nobody writes system addresses through ingest.
    pub fn can_write(&self, address: &str) -> bool {
        if is_system_address(address) {
            return false;
        }
        self.is_admin() || self.grants.iter().any(|g| g.write && prefix_matches(&g.prefix, address))
    }

    /// May this device read everything under `prefix` (for stream filters)?
    pub fn can_read_prefix(&self, prefix: &str) -> bool {
        self.is_admin() || self.grants.iter().any(|g| g.read && prefix_matches(&g.prefix, prefix))
    }

    /// Checks the device's signature policy on `content` written to `chain`.
    pub fn check_signature(&self, chain: &str, content: &TxContent) -> Result<(), Rejection> {
        // Without an idempotency key a captured signed write could be sent again as new.
        if content.signature.is_some() && content.idempotency_key.is_empty() {
            return Err(Rejection::Invalid(FieldError::new(
                "idempotency_key",
                "a signed write must carry an idempotency key, so it cannot be replayed",
            )));
        }
        match (&self.public_key, &content.signature) {
            (_, None) if self.record.require_signature => Err(Rejection::SignatureRequired(self.id.clone())),
            (None, None) => Ok(()),
            (Some(_), None) => Ok(()),
            (Some(pk), Some(_)) => {
                if content.verify_signature(chain, pk) {
                    Ok(())
                } else {
                    Err(Rejection::BadSignature(self.id.clone()))
                }
            }
            // A signature from a device with no registered key cannot be checked: refuse it
            // rather than store a claim nobody can verify.
            (None, Some(_)) => Err(Rejection::BadSignature(self.id.clone())),
        }
    }
}

/// SHA-256 of a token, hex.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random API token.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("kal_{}", hex::encode(b))
}

/// Checks a device id: key characters without `/`, at most 64 bytes.
pub fn validate_device_id(id: &str) -> Result<(), FieldError> {
    crate::tx::validate_key(id).map_err(|e| FieldError::new("id", e.reason))?;
    if id.contains('/') || id.len() > crate::tx::MAX_DEVICE_ID {
        return Err(FieldError::new("id", "must not contain '/' and be at most 64 bytes"));
    }
    if id.starts_with('_') {
        return Err(FieldError::new("id", "ids starting with '_' are reserved"));
    }
    Ok(())
}

/// Checks a grant prefix.
pub fn validate_grant_prefix(prefix: &str) -> Result<(), FieldError> {
    validate_prefix(prefix)?;
    if is_system_address(prefix) {
        return Err(FieldError::new("prefix", "the /_kalima prefix is reserved"));
    }
    Ok(())
}

#[derive(Debug, Default)]
struct State {
    devices: HashMap<String, Arc<Device>>,
    by_token: HashMap<String, String>,
}

/// The in-memory device registry.
#[derive(Debug, Default)]
pub struct Registry {
    state: RwLock<State>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the whole view from the memcache (at start).
    pub fn rebuild(&self, cache: &Memcache) {
        let mut st = State::default();
        for c in cache.values(DEVICES_ADDRESS) {
            let id = c.tx.content.key.clone();
            if let Some(dev) = build_device(&id, &c.tx.content.body, cache) {
                st.by_token.insert(dev.record.token_sha256.clone(), id.clone());
                st.devices.insert(id, Arc::new(dev));
            }
        }
        *self.state.write() = st;
    }

    /// Updates the view after system transactions committed (the memcache is already updated).
    pub fn apply(&self, txs: &[Arc<CommittedTx>], cache: &Memcache) {
        let mut touched: Vec<String> = Vec::new();
        for c in txs {
            let a = &c.tx.content.address;
            if a == DEVICES_ADDRESS {
                touched.push(c.tx.content.key.clone());
            } else if let Some(dev) = a.strip_prefix(&format!("{SYSTEM_PREFIX}/grants/")) {
                touched.push(dev.to_string());
            }
        }
        if touched.is_empty() {
            return;
        }
        let mut st = self.state.write();
        for id in touched {
            if let Some(old) = st.devices.remove(&id) {
                st.by_token.remove(&old.record.token_sha256);
            }
            let Some(c) = cache.get(DEVICES_ADDRESS, &id) else {
                continue;
            };
            if c.tx.content.kind() == TxKind::Delete {
                continue;
            }
            if let Some(dev) = build_device(&id, &c.tx.content.body, cache) {
                st.by_token.insert(dev.record.token_sha256.clone(), id.clone());
                st.devices.insert(id, Arc::new(dev));
            }
        }
    }

    /// The device presenting `token`, if known and not revoked.
    pub fn authenticate(&self, token: &str) -> Result<Arc<Device>, Rejection> {
        let digest = token_digest(token);
        let st = self.state.read();
        let id = st.by_token.get(&digest).ok_or(Rejection::UnknownDevice)?;
        let dev = st.devices.get(id).ok_or(Rejection::UnknownDevice)?;
        // The map lookup already matched; compare again in constant time for defence in depth.
        if !bool::from(dev.record.token_sha256.as_bytes().ct_eq(digest.as_bytes())) {
            return Err(Rejection::UnknownDevice);
        }
        if dev.record.revoked {
            return Err(Rejection::Revoked(dev.id.clone()));
        }
        Ok(dev.clone())
    }

    /// A device by id (including revoked ones).
    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.state.read().devices.get(id).cloned()
    }

    /// Every device, sorted by id.
    pub fn list(&self) -> Vec<Arc<Device>> {
        let mut v: Vec<_> = self.state.read().devices.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

fn build_device(id: &str, body: &[u8], cache: &Memcache) -> Option<Device> {
    let record: DeviceRecord = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target: "core::registry", device = %id, error = %e, "Device record does not parse; device ignored.");
            return None;
        }
    };
    let public_key = record.public_key.as_deref().and_then(|h| {
        let mut b = [0u8; 32];
        hex::decode_to_slice(h, &mut b).ok()?;
        VerifyingKey::from_bytes(&b).ok()
    });
    let grants = cache
        .values(&grants_address(id))
        .iter()
        .filter_map(|g| {
            let r: GrantRecord = serde_json::from_slice(&g.tx.content.body).ok()?;
            Some(Grant { prefix: g.tx.content.key.clone(), read: r.read, write: r.write })
        })
        .collect();
    Some(Device { id: id.to_string(), record, public_key, grants })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(grants: Vec<Grant>) -> Device {
        Device {
            id: "d".into(),
            record: DeviceRecord {
                token_sha256: String::new(),
                public_key: None,
                require_signature: false,
                admin: false,
                revoked: false,
            },
            public_key: None,
            grants,
        }
    }

    #[test]
    fn grants_follow_prefixes() {
        let d = device(vec![
            Grant { prefix: "/plant-1".into(), read: true, write: false },
            Grant { prefix: "/plant-1/line-2".into(), read: false, write: true },
        ]);
        assert!(d.can_read("/plant-1/line-9"));
        assert!(!d.can_write("/plant-1/line-9"));
        assert!(d.can_write("/plant-1/line-2/x"));
        assert!(!d.can_read("/plant-10"));
        assert!(!d.can_write("/_kalima/devices"));
        assert!(!d.can_read("/_kalima/devices"));
    }

    #[test]
    fn device_ids_are_checked() {
        assert!(validate_device_id("sensor-1").is_ok());
        for bad in ["", "a/b", "_node", "é"] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
        assert!(validate_grant_prefix("/_kalima").is_err());
        assert!(validate_grant_prefix("/").is_ok());
    }
}
