//! Who a relayer is: the device that signs its instructions on this chain (Ed25519) and the
//! Ethereum account that signs releases and pays for them (secp256k1).

use std::path::Path;

use alloy::signers::local::PrivateKeySigner;
use kalima_core::keys::{NodeKey, write_new_private};

use crate::error::{Error, Result};

/// A relayer's two keys.
#[derive(Clone)]
pub struct Identity {
    /// Its device id on this chain.
    pub device: String,
    /// Its device key.
    pub device_key: NodeKey,
    /// Its Ethereum key.
    pub eth: PrivateKeySigner,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("device", &self.device).field("eth", &self.eth.address()).finish()
    }
}

impl Identity {
    /// Loads both keys, creating the files (mode 0600) when they do not exist yet.
    pub fn load_or_create(device: &str, device_key_file: &Path, eth_key_file: &Path) -> Result<Self> {
        let device_key = if device_key_file.exists() {
            NodeKey::load(device_key_file)?
        } else {
            let k = NodeKey::generate();
            k.save(device_key_file)?;
            k
        };
        let eth = load_or_create_eth_key(eth_key_file)?;
        Ok(Self { device: device.to_string(), device_key, eth })
    }
}

/// Loads a secp256k1 key (hex) from `path`, creating it (mode 0600) when missing.
pub fn load_or_create_eth_key(path: &Path) -> Result<PrivateKeySigner> {
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        text.trim()
            .parse::<PrivateKeySigner>()
            .map_err(|e| Error::Config(format!("{}: not a secp256k1 key in hex: {e}", path.display())))
    } else {
        let k = PrivateKeySigner::random();
        write_new_private(path, format!("0x{}\n", hex::encode(k.to_bytes())).as_bytes())?;
        Ok(k)
    }
}
