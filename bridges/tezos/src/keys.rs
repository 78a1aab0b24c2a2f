//! The anchoring account: an Ed25519 key kept in a file as `edsk...` text (mode 0600,
//! created when missing), its `tz1` address and `edpk` public key, and the signing of
//! operation groups.

use std::path::Path;

use rand::RngCore;
use tezos_crypto_rs::PublicKeySignatureVerifier;
use tezos_crypto_rs::PublicKeyWithHash;
use tezos_crypto_rs::base58::FromBase58Check;
use tezos_crypto_rs::hash::{
    ContractTz1Hash, Ed25519Signature, HashTrait, PublicKeyEd25519, SecretKeyEd25519, SeedEd25519,
};

use crate::error::{Error, Result};
use crate::forge::{OperationGroup, SignedOperation, signing_payload};

/// Base58check prefix of the 64-byte form of an Ed25519 secret key (seed || public key),
/// also printed as `edsk...` (98 characters).
const SECRET_KEY_64_PREFIX: [u8; 4] = [43, 246, 78, 7];

/// An Ed25519 Tezos account able to sign operations.
#[derive(Clone)]
pub struct TezosKey {
    secret: SecretKeyEd25519,
    public: PublicKeyEd25519,
    address: ContractTz1Hash,
}

impl std::fmt::Debug for TezosKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TezosKey").field("address", &self.address.to_b58check()).finish()
    }
}

impl TezosKey {
    /// The key of a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let (public, secret) = SeedEd25519::try_from_bytes(&seed)
            .ok()
            .and_then(|s| s.keypair().ok())
            .unwrap_or_else(|| unreachable!("a 32-byte seed is an Ed25519 secret key"));
        let address = public.pk_hash();
        Self { secret, public, address }
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// Reads `edsk...` text: the 54-character seed form, or the 98-character form (seed and
    /// public key), optionally behind `unencrypted:` as `octez-client` stores it.
    pub fn from_b58(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        let text = text.strip_prefix("unencrypted:").unwrap_or(text);
        if text.starts_with("edesk") || text.starts_with("encrypted:") {
            return Err("an encrypted key; store it unencrypted (`edsk...`)".into());
        }
        if !text.starts_with("edsk") {
            return Err("not an Ed25519 secret key (`edsk...`)".into());
        }
        if let Ok(seed) = SeedEd25519::from_b58check(text) {
            let mut s = [0u8; 32];
            s.copy_from_slice(seed.as_ref());
            return Ok(Self::from_seed(s));
        }
        let raw = text.from_base58check().map_err(|e| format!("bad base58check: {e}"))?;
        match raw.strip_prefix(&SECRET_KEY_64_PREFIX[..]) {
            Some(body) if body.len() == 64 => {
                let mut s = [0u8; 32];
                s.copy_from_slice(&body[..32]);
                let key = Self::from_seed(s);
                if key.public.as_ref() != &body[32..] {
                    return Err("its public half does not match its secret half".into());
                }
                Ok(key)
            }
            _ => Err("not an Ed25519 secret key (`edsk...`)".into()),
        }
    }

    /// Loads the key in `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let err = |message: String| Error::Key { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(target: "bridge::tezos", path = %path.display(), "The Tezos key file is readable by others; chmod 600 it.");
            }
        }
        Self::from_b58(&text).map_err(err)
    }

    /// Loads the key in `path`, creating it (mode 0600) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate();
        kalima_core::keys::write_new_private(path, format!("{}\n", key.secret_b58()).as_bytes())?;
        tracing::info!(target: "bridge::tezos", path = %path.display(), address = %key.address_b58(), "Created a Tezos anchoring key; fund its address.");
        Ok(key)
    }

    /// The account (`tz1...`).
    pub fn address(&self) -> &ContractTz1Hash {
        &self.address
    }

    /// The account in base58check (`tz1...`).
    pub fn address_b58(&self) -> String {
        self.address.to_b58check()
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKeyEd25519 {
        &self.public
    }

    /// The public key in base58check (`edpk...`).
    pub fn public_key_b58(&self) -> String {
        self.public.to_b58check()
    }

    /// The secret key in base58check (`edsk...`, the 54-character seed form).
    pub fn secret_b58(&self) -> String {
        self.secret.to_b58check()
    }

    /// Signs forged operation bytes: Ed25519 over blake2b-256(0x03 || forged).
    pub fn sign_forged(&self, forged: &[u8]) -> Result<[u8; 64]> {
        // SecretKeyEd25519::sign hashes its input with blake2b-256 before signing.
        let sig = self.secret.sign(signing_payload(forged)).map_err(|e| Error::encoding(format!("signing: {e}")))?;
        let mut out = [0u8; 64];
        if sig.as_ref().len() != 64 {
            return Err(Error::encoding("signing: not a 64-byte signature"));
        }
        out.copy_from_slice(sig.as_ref());
        Ok(out)
    }

    /// Forges and signs `group`.
    pub fn sign(&self, group: OperationGroup) -> Result<SignedOperation> {
        let forged = group.forge()?;
        let signature = self.sign_forged(&forged)?;
        Ok(SignedOperation { group, forged, signature })
    }
}

/// True when `signature` by `public_key` covers `forged` (with the operation watermark).
pub fn verify_forged(public_key: &PublicKeyEd25519, forged: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(sig) = Ed25519Signature::try_from_bytes(signature) else { return false };
    public_key.verify_signature(&sig, &signing_payload(forged)).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_forms_round_trip() {
        let key = TezosKey::from_seed([7; 32]);
        assert!(key.address_b58().starts_with("tz1"));
        assert!(key.public_key_b58().starts_with("edpk"));
        let edsk = key.secret_b58();
        assert!(edsk.starts_with("edsk") && edsk.len() == 54, "{edsk}");
        let again = TezosKey::from_b58(&format!("unencrypted:{edsk}\n")).map(|k| k.address_b58());
        assert_eq!(again.as_deref(), Ok(key.address_b58().as_str()));
    }

    #[test]
    fn refuses_what_is_not_an_ed25519_secret_key() {
        let key = TezosKey::from_seed([7; 32]);
        let mut bad_checksum = key.secret_b58();
        let last = if bad_checksum.ends_with('a') { 'b' } else { 'a' };
        bad_checksum.pop();
        bad_checksum.push(last);
        for bad in ["", "edsk", "edesk1abc", &key.public_key_b58(), &key.address_b58(), &bad_checksum] {
            assert!(TezosKey::from_b58(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor-tezos.key");
        let a = TezosKey::load_or_create(&path).unwrap().address_b58();
        let b = TezosKey::load_or_create(&path).unwrap().address_b58();
        assert!(a.starts_with("tz1"));
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn signature_verifies_and_covers_the_bytes() {
        let key = TezosKey::from_seed([9; 32]);
        let forged = b"some forged operation".to_vec();
        let sig = key.sign_forged(&forged).unwrap();
        assert!(verify_forged(key.public_key(), &forged, &sig));
        assert!(!verify_forged(key.public_key(), b"other bytes", &sig));
    }
}
