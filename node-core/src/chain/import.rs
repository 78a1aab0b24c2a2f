//! Importing blocks built by another node (a master catching up from a snapshot): each block
//! must extend the local head, and its transactions must rebuild its Merkle root, before it
//! is stored.

use std::sync::Arc;

use super::apply::Applier;
use crate::block::BlockHeader;
use crate::error::{Error, Result};
use crate::merkle::leaf_hash;
use crate::store::{BlockRecord, CommittedTx, PendingTx};
use crate::tx::Transaction;

impl Applier {
    /// Checks and appends blocks given as (canonical header, canonical transactions), in
    /// height order, with `state` written alongside the last one.
    pub(crate) async fn import(&mut self, blocks: &[(Vec<u8>, Vec<Vec<u8>>)], state: &[(&str, Vec<u8>)]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let head = self.inner.head.read().clone();
        let mut frontier = self.frontier.clone();
        let mut prev = if self.has_genesis() { Some((head.block.header.height, head.block.hash)) } else { None };
        let mut records = Vec::with_capacity(blocks.len());
        let mut pending = Vec::new();
        for (header_bytes, txs) in blocks {
            let header = BlockHeader::decode(header_bytes)?;
            let height = header.height;
            let corrupt = |reason: String| Error::Corrupt { height, reason };
            match prev {
                Some((h, hash)) if header.height != h + 1 || header.prev_hash != hash => {
                    return Err(corrupt(format!("block does not extend the local head at height {h}")));
                }
                None if header.height != 0 || header.prev_hash != [0; 32] => {
                    return Err(corrupt("the first block imported into an empty chain must be block 0".into()));
                }
                _ => {}
            }
            if txs.len() != header.tx_count as usize {
                return Err(corrupt(format!("{} transactions sent for a block of {}", txs.len(), header.tx_count)));
            }
            for bytes in txs {
                let tx = Transaction::decode(bytes)?;
                if tx.global_sequence != frontier.len() {
                    return Err(corrupt(format!("transaction {} is out of sequence", tx.global_sequence)));
                }
                let id = leaf_hash(bytes);
                frontier.push(id);
                pending.push(PendingTx { committed: Arc::new(CommittedTx { tx, id, height }), bytes: bytes.clone() });
            }
            if header.tree_size != frontier.len() || header.merkle_root != frontier.root() {
                return Err(corrupt("the transactions sent do not rebuild the block's Merkle root".into()));
            }
            let hash = header.hash();
            prev = Some((height, hash));
            records.push(BlockRecord { header, hash });
        }
        self.write_and_publish(&head, records, pending, frontier, state).await?;
        Ok(())
    }
}
