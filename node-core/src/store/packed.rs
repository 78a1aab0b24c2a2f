//! The v2 row formats: a block's transactions packed into one sealed body, and the salted
//! 64-bit hashes that key the lookup indexes.

use sha2::{Digest, Sha256};

/// Version byte of a packed body.
const BODY_VERSION: u8 = 1;

/// Why a packed body could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packed block body: {0}")]
pub struct BodyError(pub String);

/// Packs canonical transaction bytes: `version u8, count u32, (len u32, bytes)*`, big-endian.
pub fn pack<'a>(txs: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + txs.len() * 200);
    out.push(BODY_VERSION);
    out.extend_from_slice(&(txs.len() as u32).to_be_bytes());
    for t in txs {
        out.extend_from_slice(&(t.len() as u32).to_be_bytes());
        out.extend_from_slice(t);
    }
    out
}

/// Splits a packed body into its transactions' canonical bytes, in order.
pub fn unpack(body: &[u8]) -> Result<Vec<&[u8]>, BodyError> {
    let (&version, rest) = body.split_first().ok_or_else(|| BodyError("empty".into()))?;
    if version != BODY_VERSION {
        return Err(BodyError(format!("unknown version {version}")));
    }
    let (count, mut rest) = split_u32(rest)?;
    // Each entry takes at least its 4-byte length: a count beyond that is a lie.
    if count as usize > rest.len() / 4 {
        return Err(BodyError(format!("count {count} exceeds the body")));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let (len, r) = split_u32(rest)?;
        let len = len as usize;
        if len > r.len() {
            return Err(BodyError(format!("transaction {i} runs past the end")));
        }
        let (tx, r) = r.split_at(len);
        out.push(tx);
        rest = r;
    }
    if !rest.is_empty() {
        return Err(BodyError(format!("{} trailing bytes", rest.len())));
    }
    Ok(out)
}

fn split_u32(b: &[u8]) -> Result<(u32, &[u8]), BodyError> {
    if b.len() < 4 {
        return Err(BodyError("truncated".into()));
    }
    let (n, rest) = b.split_at(4);
    Ok((u32::from_be_bytes([n[0], n[1], n[2], n[3]]), rest))
}

/// The first 8 bytes of a hash as the signed integer the index columns hold.
pub fn prefix_i64(hash: &[u8; 32]) -> i64 {
    i64::from_be_bytes([hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7]])
}

/// Keys of the lookup indexes: SHA-256 under a per-store random salt, so that no writer can
/// aim a collision at someone else's history and no name is stored in plaintext.
#[derive(Clone)]
pub struct IndexKeys {
    salt: [u8; 32],
}

impl std::fmt::Debug for IndexKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKeys(..)")
    }
}

impl IndexKeys {
    /// Keys under `salt`.
    pub fn new(salt: [u8; 32]) -> Self {
        Self { salt }
    }

    /// The salt.
    pub fn salt(&self) -> &[u8; 32] {
        &self.salt
    }

    fn hash(&self, tag: u8, fields: &[&str]) -> i64 {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update([tag]);
        for f in fields {
            // Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
            h.update((f.len() as u32).to_be_bytes());
            h.update(f.as_bytes());
        }
        prefix_i64(&h.finalize().into())
    }

    /// Key of one address + key history.
    pub fn stream(&self, address: &str, key: &str) -> i64 {
        self.hash(b's', &[address, key])
    }

    /// Key of one address.
    pub fn address(&self, address: &str) -> i64 {
        self.hash(b'a', &[address])
    }

    /// Key of one device's idempotency key.
    pub fn idempotency(&self, device: &str, key: &str) -> i64 {
        self.hash(b'i', &[device, key])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_gives_the_same_transactions() {
        let txs: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![], vec![7u8; 300]];
        let body = pack(txs.iter().map(Vec::as_slice));
        let back = unpack(&body).expect("unpack");
        assert_eq!(back, txs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn damaged_bodies_are_refused_not_misread() {
        let body = pack([b"abc".as_slice(), b"de".as_slice()].into_iter());
        assert!(unpack(&body[..body.len() - 1]).is_err(), "truncated");
        let mut longer = body.clone();
        longer.push(0);
        assert!(unpack(&longer).is_err(), "trailing byte");
        let mut bad_count = body.clone();
        bad_count[4] = 200;
        assert!(unpack(&bad_count).is_err(), "count");
        let mut bad_version = body;
        bad_version[0] = 9;
        assert!(unpack(&bad_version).is_err(), "version");
        assert!(unpack(&[]).is_err(), "empty");
        assert!(unpack(&[1, 0xff, 0xff, 0xff, 0xff]).is_err(), "huge count");
    }

    #[test]
    fn index_keys_depend_on_salt_kind_and_field_boundaries() {
        let a = IndexKeys::new([1; 32]);
        let b = IndexKeys::new([2; 32]);
        assert_eq!(a.stream("/p", "k"), a.stream("/p", "k"));
        assert_ne!(a.stream("/p", "k"), b.stream("/p", "k"));
        assert_ne!(a.stream("/pk", ""), a.stream("/p", "k"));
        assert_ne!(a.address("/p"), a.stream("/p", ""));
        assert_ne!(a.idempotency("/p", "k"), a.stream("/p", "k"));
    }
}
