//! Whole-chain verification: every block's hash and link, every transaction's decryption,
//! encoding and leaf hash, every device signature against the key registered at the time,
//! every block's Merkle root from genesis, and every checkpoint's signature and root.
//! Reports the first faulty height.

use std::collections::{HashMap, VecDeque};

use ed25519_dalek::VerifyingKey;

use subtle::ConstantTimeEq;

use crate::block::BlockHeader;
use crate::error::{Error, Result};
use crate::merkle::{Frontier, Hash};
use crate::registry::{DEVICES_ADDRESS, DeviceRecord};
use crate::store::{CommittedTx, IndexDigest, RawBody, Store};

/// Blocks read per round trip.
const PAGE_BLOCKS: u32 = 200;

/// What a successful verification covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blocks checked.
    pub blocks: u64,
    /// Transactions checked.
    pub transactions: u64,
    /// Stored bytes read (headers and sealed transactions).
    pub bytes: u64,
    /// Checkpoints whose signature and root were checked.
    pub checkpoints: u64,
    /// Device signatures checked.
    pub signatures: u64,
}

fn corrupt(height: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt { height, reason: reason.into() }
}

/// Device public keys as the chain registered them so far, to check device signatures
/// against the key that was in force when each transaction was written.
#[derive(Default)]
struct Signers {
    keys: HashMap<String, VerifyingKey>,
    signatures: u64,
}

impl Signers {
    fn check(&mut self, chain: &str, c: &CommittedTx) -> std::result::Result<(), String> {
        let content = &c.tx.content;
        if content.signature.is_some() {
            let seq = c.tx.global_sequence;
            let key = self.keys.get(&content.device_id).ok_or_else(|| {
                format!("transaction {seq} is signed by {} which has no registered key", content.device_id)
            })?;
            if !content.verify_signature(chain, key) {
                return Err(format!("transaction {seq}: device signature does not verify"));
            }
            self.signatures += 1;
        }
        if content.address == DEVICES_ADDRESS {
            let key =
                serde_json::from_slice::<DeviceRecord>(&content.body).ok().and_then(|r| r.public_key).and_then(|h| {
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(h, &mut b).ok()?;
                    VerifyingKey::from_bytes(&b).ok()
                });
            match key {
                Some(k) => self.keys.insert(content.key.clone(), k),
                None => self.keys.remove(&content.key),
            };
        }
        Ok(())
    }
}

/// A task that stops when verification returns early.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What opening one body produced: its transactions and the index rows they imply.
type Opened = Result<(Vec<CommittedTx>, IndexDigest)>;

fn open_one(store: &Store, raw: &RawBody, empty: &IndexDigest) -> Opened {
    let txs = store.open_body(raw)?;
    let mut digest = empty.empty_like();
    for c in &txs {
        digest.add(&store.index_rows(c));
    }
    Ok((txs, digest))
}

/// Decrypts, decodes and hashes bodies on every core; results keep the bodies' order.
fn open_parallel(store: &Store, bodies: &[RawBody], empty: &IndexDigest) -> Vec<Opened> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if threads == 1 || bodies.len() < 4 {
        return bodies.iter().map(|r| open_one(store, r, empty)).collect();
    }
    let per = bodies.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(|r| open_one(store, r, empty)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(Error::Crypto("verification thread panicked".into()))]))
            .collect()
    })
}

/// Verifies the whole chain in `store`; `progress(height)` is called after each page.
/// Checkpoint signatures are checked against the key named in each checkpoint; use
/// [`verify_chain_with`] to also pin which keys may lead blocks and sign checkpoints.
pub async fn verify_chain(store: &Store, chain: &str, progress: impl FnMut(u64)) -> Result<VerifyReport> {
    verify_chain_with(store, chain, &[], progress).await
}

/// [`verify_chain`], refusing block leaders and checkpoint signers outside `trusted`
/// (hex public keys) unless it is empty.
pub async fn verify_chain_with(
    store: &Store,
    chain: &str,
    trusted: &[String],
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport> {
    let trusts = |key: &str| trusted.is_empty() || trusted.iter().any(|t| t.eq_ignore_ascii_case(key));
    let mut report = VerifyReport::default();
    let mut frontier = Frontier::new();
    let mut prev_hash: Hash = [0; 32];
    let mut next_height = 0u64;
    let mut signers = Signers::default();
    let mut claims: Vec<(u64, u64, String)> = Vec::new();
    let mut expected_index = IndexDigest::random();
    let mut ledger = crate::ledger::Audit::default();
    // A running node keeps committing: verify the chain up to the head seen now, and only the
    // checkpoints made by then.
    let Some(snapshot) = store.latest_raw_block().await? else {
        return Ok(report);
    };
    let last_height = snapshot.height;
    // The stored index tables are read while the bodies are checked (one is database-bound,
    // the other CPU-bound).
    let mut stored_index = {
        let (store, empty, size) = (store.clone(), expected_index.empty_like(), snapshot.tree_size);
        AbortOnDrop(tokio::spawn(async move { store.stored_index_digest(size, &empty).await }))
    };
    let mut checkpoints: VecDeque<_> = store
        .checkpoints_from(chain, 0, u32::MAX)
        .await?
        .into_iter()
        .filter(|c| c.tree_size <= snapshot.tree_size)
        .collect();
    while let Some(cp) = checkpoints.front().filter(|c| c.tree_size == 0) {
        if !cp.verify() || !trusts(&cp.signer) || cp.root != frontier.root() {
            return Err(corrupt(cp.height, "checkpoint at tree size 0 does not verify"));
        }
        report.checkpoints += 1;
        checkpoints.pop_front();
    }
    while next_height <= last_height {
        let page = u32::try_from((last_height - next_height + 1).min(u64::from(PAGE_BLOCKS))).unwrap_or(PAGE_BLOCKS);
        let blocks = store.raw_blocks(next_height, page).await?;
        if blocks.is_empty() {
            return Err(corrupt(next_height, "block missing"));
        }
        let mut headers = Vec::with_capacity(blocks.len());
        for raw in &blocks {
            let h = raw.height;
            if h != next_height {
                return Err(corrupt(next_height, format!("block missing (next stored block is {h})")));
            }
            let header = BlockHeader::decode(&raw.header).map_err(|e| corrupt(h, format!("header: {e}")))?;
            let hash = header.hash();
            if header.height != h {
                return Err(corrupt(h, format!("header says height {}", header.height)));
            }
            if header.timestamp_ms != raw.timestamp_ms
                || header.tree_size != raw.tree_size
                || u64::from(header.tx_count) != raw.tx_count
            {
                return Err(corrupt(h, "block columns do not match the header"));
            }
            if !bool::from(hash.as_slice().ct_eq(raw.hash.as_slice())) {
                return Err(corrupt(h, "stored block hash does not match the header"));
            }
            if header.prev_hash != prev_hash {
                return Err(corrupt(h, "prev_hash does not link to the previous block"));
            }
            if !trusts(&header.leader) {
                return Err(corrupt(h, format!("block built by an untrusted node {}", header.leader)));
            }
            if header.first_sequence()
                != frontier.len() + headers.iter().map(|x: &BlockHeader| u64::from(x.tx_count)).sum::<u64>()
            {
                return Err(corrupt(h, "transaction count does not match the tree size"));
            }
            prev_hash = hash;
            next_height += 1;
            report.bytes += raw.header.len() as u64;
            headers.push(header);
        }
        let (Some(first), Some(last)) = (headers.first(), headers.last()) else {
            break;
        };
        let bodies = store.raw_bodies(first.height, u32::try_from(headers.len()).unwrap_or(PAGE_BLOCKS)).await?;
        // Decryption and hashing dominate; spread them over the cores, then check in order.
        let opened = open_parallel(store, &bodies, &expected_index);
        let mut it = bodies.iter().zip(opened);
        for header in &headers {
            let Some((raw, opened)) = it.next().filter(|(raw, _)| raw.height == header.height) else {
                return Err(corrupt(header.height, "the block's transactions are missing"));
            };
            if raw.first_seq != header.first_sequence() {
                return Err(corrupt(
                    header.height,
                    format!("transactions stored from {} instead of {}", raw.first_seq, header.first_sequence()),
                ));
            }
            let (txs, digest) = opened.map_err(|e| match e {
                // open_body already names the fault; keep its message, report this block.
                Error::Corrupt { reason, .. } => corrupt(header.height, reason),
                e => corrupt(header.height, format!("transactions: {e}")),
            })?;
            if txs.len() as u64 != u64::from(header.tx_count) {
                return Err(corrupt(
                    header.height,
                    format!("{} transactions stored for {} in the header", txs.len(), header.tx_count),
                ));
            }
            expected_index.merge(&digest);
            report.bytes += raw.stored_len() as u64;
            for c in &txs {
                signers.check(chain, c).map_err(|reason| corrupt(header.height, reason))?;
                ledger.observe(c).map_err(|reason| corrupt(header.height, reason))?;
                if c.tx.content.address == crate::cluster::cosign::CHECKPOINTS_ADDRESS {
                    let claim = cosigned_claim(chain, c, &trusts).map_err(|reason| corrupt(header.height, reason))?;
                    claims.push(claim);
                }
                frontier.push(c.id);
                report.transactions += 1;
                while let Some(cp) = checkpoints.front() {
                    if cp.tree_size > frontier.len() {
                        break;
                    }
                    if cp.tree_size == frontier.len() {
                        if !cp.verify() || !trusts(&cp.signer) || cp.root != frontier.root() {
                            return Err(corrupt(
                                cp.height,
                                format!("checkpoint at tree size {} does not verify", cp.tree_size),
                            ));
                        }
                        report.checkpoints += 1;
                    }
                    checkpoints.pop_front();
                }
            }
            if frontier.len() != header.tree_size || frontier.root() != header.merkle_root {
                return Err(corrupt(header.height, "Merkle root does not match the transactions"));
            }
            report.blocks += 1;
        }
        if it.next().is_some() {
            return Err(corrupt(last.height, "transactions stored beyond the last block"));
        }
        progress(next_height.saturating_sub(1));
    }
    if let Some(cp) = checkpoints.front() {
        return Err(corrupt(cp.height, format!("checkpoint at tree size {} is beyond the chain", cp.tree_size)));
    }
    // Checkpoints past the snapshot were left out above; none may name a size the chain has
    // not reached even now (a flipped bit in tree_size would otherwise hide the row).
    let head_size = store.latest_raw_block().await?.map(|b| b.tree_size).unwrap_or(0);
    let later = store.checkpoints_from(chain, snapshot.tree_size.saturating_add(1), u32::MAX).await?;
    if let Some(cp) = later.iter().find(|c| c.tree_size > head_size) {
        return Err(corrupt(cp.height, format!("checkpoint at tree size {} is beyond the chain", cp.tree_size)));
    }
    // Rows beyond the snapshot belong to blocks committed since; only a quiet store can
    // show rows outside every block.
    let stored = store.tx_count().await?;
    let bodies = store.body_count().await?;
    let head_now = store.latest_raw_block().await?.map(|b| b.hash);
    if head_now.as_ref() == Some(&snapshot.hash) && (stored != frontier.len() || bodies != report.blocks) {
        return Err(corrupt(
            last_height,
            format!("{} transactions stored outside any block", stored.saturating_sub(frontier.len()).max(1)),
        ));
    }
    // The lookup indexes are derived from the transactions: compare them as multisets.
    let stored_index = (&mut stored_index.0).await.map_err(|e| Error::Fatal(format!("index digest task: {e}")))??;
    if let Some((table, rows, expected)) = stored_index.first_difference(&expected_index) {
        return Err(corrupt(
            last_height,
            format!("index {table} does not match the transactions ({rows} rows stored, {expected} expected)"),
        ));
    }
    // Commits write all their blocks at once, so the head read above ends a commit: the
    // ledger's records must add up there.
    ledger.check().map_err(|reason| corrupt(last_height, reason))?;
    // A co-signed checkpoint names a block by height: it must have that tree size and root.
    for (height, tree_size, root) in &claims {
        let b = store.block(*height).await?;
        if !b.is_some_and(|b| b.header.tree_size == *tree_size && hex::encode(b.header.merkle_root) == *root) {
            return Err(corrupt(
                *height,
                format!("the co-signed checkpoint at tree size {tree_size} does not match block {height}"),
            ));
        }
        report.checkpoints += 1;
    }
    report.signatures = signers.signatures;
    Ok(report)
}

/// Checks a co-signed checkpoint recorded on the chain: every signature verifies over the
/// checkpoint's own text, by a trusted key; returns (height, tree size, root) to check
/// against the blocks.
fn cosigned_claim(
    chain: &str,
    c: &CommittedTx,
    trusts: &impl Fn(&str) -> bool,
) -> std::result::Result<(u64, u64, String), String> {
    let seq = c.tx.global_sequence;
    let cp: crate::checkpoint::CheckpointJson = serde_json::from_slice(&c.tx.content.body)
        .map_err(|e| format!("transaction {seq}: co-signed checkpoint does not parse: {e}"))?;
    let valid = cp.valid_signers();
    if cp.chain != chain || cp.signatures.is_empty() || valid.len() != cp.signatures.len() {
        return Err(format!("transaction {seq}: a co-signed checkpoint signature does not verify"));
    }
    if let Some(k) = valid.iter().find(|k| !trusts(k)) {
        return Err(format!("transaction {seq}: checkpoint co-signed by untrusted node {k}"));
    }
    if cp.tree_size > c.tx.global_sequence {
        return Err(format!("transaction {seq}: checkpoint of tree size {} recorded before it", cp.tree_size));
    }
    Ok((cp.height, cp.tree_size, cp.root))
}

#[cfg(test)]
mod cosigned_tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, CheckpointJson};
    use crate::keys::NodeKey;
    use crate::tx::{Transaction, TxContent};

    fn recorded(cp: &CheckpointJson, seq: u64) -> CommittedTx {
        let tx = Transaction {
            global_sequence: seq,
            sequence: 1,
            timestamp_ms: 1,
            previous: [0; 32],
            content: TxContent {
                device_id: "_node".into(),
                address: crate::cluster::cosign::CHECKPOINTS_ADDRESS.into(),
                key: "latest".into(),
                body: serde_json::to_vec(cp).unwrap_or_default(),
                ..TxContent::default()
            },
        };
        CommittedTx { id: tx.id(), tx, height: 9 }
    }

    fn cosigned(keys: &[&NodeKey]) -> CheckpointJson {
        let mut cp = Checkpoint::sign(keys[0], "dev", 10, [7; 32], 4, 1000).to_json();
        for k in &keys[1..] {
            cp.signatures.push(Checkpoint::sign(k, "dev", 10, [7; 32], 4, 1000).to_json().signatures.remove(0));
        }
        cp
    }

    #[test]
    fn co_signed_checkpoints_need_valid_trusted_signatures() {
        let (a, b, c) = (NodeKey::from_seed([1; 32]), NodeKey::from_seed([2; 32]), NodeKey::from_seed([3; 32]));
        let trusted = [a.public_hex(), b.public_hex()];
        let trusts = |k: &str| trusted.iter().any(|t| t == k);
        let good = cosigned(&[&a, &b]);
        assert_eq!(cosigned_claim("dev", &recorded(&good, 20), &trusts), Ok((4, 10, hex::encode([7u8; 32]))));

        let outsider = cosigned(&[&a, &c]);
        assert!(cosigned_claim("dev", &recorded(&outsider, 20), &trusts).unwrap_err().contains("untrusted"));

        let mut moved = good.clone();
        moved.root = hex::encode([8u8; 32]);
        assert!(cosigned_claim("dev", &recorded(&moved, 20), &trusts).is_err(), "a signature moved to another root");

        let mut forged = good.clone();
        forged.signatures[1].signature = forged.signatures[0].signature.clone();
        assert!(cosigned_claim("dev", &recorded(&forged, 20), &trusts).is_err(), "a copied signature");

        assert!(cosigned_claim("other", &recorded(&good, 20), &trusts).is_err(), "another chain's checkpoint");
        assert!(cosigned_claim("dev", &recorded(&good, 5), &trusts).is_err(), "recorded before its tree size");
    }
}
