//! Key material: the node's Ed25519 identity (signs checkpoints) and the AES-256-GCM data
//! keys that encrypt transactions at rest, with rotation that keeps old records readable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the node key inside the data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the data-key ring inside the data directory.
pub const DATA_KEYS_FILE: &str = "data-keys.json";

/// The node's Ed25519 identity.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public_hex())
    }
}

impl NodeKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Builds a key from its 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Reads the hex seed written by [`NodeKey::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed)
            .map_err(|e| Error::Config(format!("{}: not a 64-hex-digit key: {e}", path.display())))?;
        Ok(Self::from_seed(seed))
    }

    /// Writes the hex seed to a new file, readable by the owner only; never replaces a key.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_new_private(path, hex::encode(self.0.to_bytes()).as_bytes())
    }

    /// The public half.
    pub fn public(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    /// The public key as lowercase hex (the node's id on the chain).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public().as_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

#[derive(Serialize, Deserialize)]
struct KeyRingFile {
    active: u32,
    keys: BTreeMap<u32, String>,
}

/// The ring of data keys; the active one encrypts, every one decrypts.
pub struct DataKeys {
    path: Option<PathBuf>,
    active: u32,
    ciphers: BTreeMap<u32, Aes256Gcm>,
    // Nonce = 8 random bytes + 4-byte counter; the prefix is drawn again at start and before
    // the counter wraps. Two prefixes collide with probability ~P^2/2^65 over P draws, so
    // restarts (which reset the counter) cannot realistically repeat a nonce under one key.
    nonce_state: Mutex<([u8; 8], u32)>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys").field("active", &self.active).field("ids", &self.ids()).finish()
    }
}

/// Size of the nonce stored in front of each sealed record.
pub const NONCE_LEN: usize = 12;

impl DataKeys {
    /// Creates a ring with one fresh key in a new file at `path`; never replaces a ring.
    pub fn create(path: &Path) -> Result<Self> {
        let mut keys = BTreeMap::new();
        keys.insert(1, random_key_hex());
        let file = KeyRingFile { active: 1, keys };
        let text = serde_json::to_string_pretty(&file).map_err(|e| Error::Config(e.to_string()))?;
        write_new_private(path, text.as_bytes())?;
        Self::from_file(Some(path.to_path_buf()), file)
    }

    /// Loads the ring written by [`DataKeys::create`] / [`DataKeys::rotate`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: KeyRingFile =
            serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_file(Some(path.to_path_buf()), file)
    }

    /// An in-memory ring with one fixed key, for tests and benchmarks.
    pub fn ephemeral() -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(1, random_key_hex());
        Self::from_file(None, KeyRingFile { active: 1, keys }).unwrap_or_else(|_| unreachable!())
    }

    fn from_file(path: Option<PathBuf>, file: KeyRingFile) -> Result<Self> {
        let mut ciphers = BTreeMap::new();
        for (id, hexkey) in &file.keys {
            let mut k = [0u8; 32];
            hex::decode_to_slice(hexkey, &mut k).map_err(|e| Error::Config(format!("data key {id}: {e}")))?;
            let cipher = Aes256Gcm::new_from_slice(&k).map_err(|e| Error::Config(format!("data key {id}: {e}")))?;
            ciphers.insert(*id, cipher);
        }
        if !ciphers.contains_key(&file.active) {
            return Err(Error::Config(format!("active data key {} is not in the ring", file.active)));
        }
        Ok(Self { path, active: file.active, ciphers, nonce_state: Mutex::new((random_prefix(), 0)) })
    }

    /// Adds a new key, makes it active and saves the ring; returns the new id.
    pub fn rotate(path: &Path) -> Result<u32> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut file: KeyRingFile =
            serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let id = file.keys.keys().next_back().copied().unwrap_or(0) + 1;
        file.keys.insert(id, random_key_hex());
        file.active = id;
        write_ring(path, &file)?;
        Ok(id)
    }

    /// Id of the key that encrypts new records.
    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// Every key id in the ring.
    pub fn ids(&self) -> Vec<u32> {
        self.ciphers.keys().copied().collect()
    }

    /// Where the ring lives, if on disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Encrypts `plain` under the active key; `aad` binds it to its place in the chain.
    /// Returns (key id, nonce || ciphertext).
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<(u32, Vec<u8>)> {
        let cipher = self.ciphers.get(&self.active).ok_or(Error::UnknownDataKey(self.active))?;
        let mut nonce = [0u8; NONCE_LEN];
        {
            let mut st = self.nonce_state.lock();
            if st.1 == u32::MAX {
                *st = (random_prefix(), 0);
            }
            nonce[..8].copy_from_slice(&st.0);
            nonce[8..].copy_from_slice(&st.1.to_be_bytes());
            st.1 += 1;
        }
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| Error::Crypto("encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok((self.active, out))
    }

    /// Decrypts a record sealed by [`DataKeys::seal`]; fails if any byte was altered.
    pub fn open(&self, key_id: u32, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let cipher = self.ciphers.get(&key_id).ok_or(Error::UnknownDataKey(key_id))?;
        if sealed.len() < NONCE_LEN {
            return Err(Error::Crypto("sealed record shorter than its nonce".into()));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| Error::Crypto("authentication tag mismatch".into()))
    }
}

fn random_prefix() -> [u8; 8] {
    let mut p = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut p);
    p
}

fn random_key_hex() -> String {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    hex::encode(k)
}

fn write_ring(path: &Path, file: &KeyRingFile) -> Result<()> {
    let text = serde_json::to_string_pretty(file).map_err(|e| Error::Config(e.to_string()))?;
    write_private(path, text.as_bytes())
}

/// Writes a secret to a file that must not exist yet (mode 0600 on Unix): key material is
/// never overwritten by accident, since records sealed under a lost key are lost too.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes a secret file atomically (temp file + rename), mode 0600 on Unix.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_old_records_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_KEYS_FILE);
        let ring = DataKeys::create(&path).unwrap();
        let (id1, sealed1) = ring.seal(b"old", b"aad1").unwrap();
        assert_eq!(DataKeys::rotate(&path).unwrap(), 2);
        let ring = DataKeys::load(&path).unwrap();
        assert_eq!(ring.active_id(), 2);
        let (id2, sealed2) = ring.seal(b"new", b"aad2").unwrap();
        assert_eq!((id1, id2), (1, 2));
        assert_eq!(ring.open(id1, &sealed1, b"aad1").unwrap(), b"old");
        assert_eq!(ring.open(id2, &sealed2, b"aad2").unwrap(), b"new");
    }

    #[test]
    fn tampering_is_detected() {
        let ring = DataKeys::ephemeral();
        let (id, mut sealed) = ring.seal(b"reading", b"pos").unwrap();
        assert!(ring.open(id, &sealed, b"other").is_err(), "aad must bind the record");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(ring.open(id, &sealed, b"pos").is_err());
        assert!(ring.open(99, &sealed, b"pos").is_err());
    }

    #[test]
    fn restarts_draw_a_new_nonce_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_KEYS_FILE);
        DataKeys::create(&path).unwrap();
        let first = DataKeys::load(&path).unwrap().seal(b"x", b"").unwrap().1;
        let second = DataKeys::load(&path).unwrap().seal(b"x", b"").unwrap().1;
        // Both processes start their counter at 0: only the 8-byte prefix keeps nonces apart.
        assert_eq!(first[8..NONCE_LEN], second[8..NONCE_LEN]);
        assert_ne!(first[..8], second[..8]);
    }

    #[test]
    fn nonces_never_repeat() {
        let ring = DataKeys::ephemeral();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (_, s) = ring.seal(b"x", b"").unwrap();
            assert!(seen.insert(s[..NONCE_LEN].to_vec()));
        }
    }
}
