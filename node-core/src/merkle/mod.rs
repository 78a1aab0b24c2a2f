//! The global, append-only Merkle tree over every transaction of the chain.
//!
//! This module owns RFC 6962 hashing (leaf, node and empty-tree hashes), the
//! in-memory state of the tree, roots at the current and at historic sizes,
//! inclusion and consistency proofs with their verification (RFC 6962 section
//! 2.1, verified as in RFC 9162 sections 2.1.3.2 and 2.1.4.2), a streaming
//! [`Frontier`] for chain verification, and the JSON shapes of proofs.
//!
//! The chain may hold billions of leaves, so the tree keeps only the roots of
//! aligned 256-leaf chunks (and of the perfect subtrees above them) plus the
//! leaf hashes of the last, incomplete chunk: about one hash per 128 leaves.
//! Leaf hashes of older chunks live in the database. Functions that need them
//! take a [`LeafSource`] and report [`MerkleError::MissingChunk`] when a chunk
//! is absent; the caller fetches that chunk, adds it to the source and calls
//! again.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

use sha2::{Digest, Sha256};

mod frontier;
mod json;
mod verify;

pub use frontier::Frontier;
pub use json::{ConsistencyProof, InclusionProof};
pub use verify::{verify_consistency, verify_inclusion};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Height of the chunks whose leaf hashes are kept out of memory.
pub const CHUNK_LEVEL: u32 = 8;

/// Number of leaves in one chunk.
pub const CHUNK_SIZE: u64 = 1 << CHUNK_LEVEL;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// RFC 6962 leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new().chain_update([LEAF_PREFIX]).chain_update(data).finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new().chain_update([NODE_PREFIX]).chain_update(left).chain_update(right).finalize().into()
}

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// Index of the chunk that holds leaf `index`.
pub fn chunk_of(index: u64) -> u64 {
    index >> CHUNK_LEVEL
}

/// Errors of proof and historic-root computations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MerkleError {
    /// The leaf hashes of this chunk are needed but not in the leaf source.
    #[error("leaf hashes of chunk {0} are needed but were not supplied")]
    MissingChunk(u64),
    /// A supplied chunk does not hold exactly `CHUNK_SIZE` leaf hashes.
    #[error("chunk {index} was supplied with {len} leaf hashes instead of {}", CHUNK_SIZE)]
    MalformedChunk {
        /// Chunk index.
        index: u64,
        /// Number of leaf hashes supplied.
        len: usize,
    },
    /// The chunk's leaf hashes do not hash to the chunk root held in memory.
    #[error("leaf hashes supplied for chunk {0} do not match its root")]
    ChunkMismatch(u64),
    /// The chunk is not a complete chunk of this tree.
    #[error("chunk {0} is not a complete chunk of this tree")]
    NoSuchChunk(u64),
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is out of range for a tree of size {size}")]
    IndexOutOfRange {
        /// Requested leaf index.
        index: u64,
        /// Tree size the index was checked against.
        size: u64,
    },
    /// The requested tree size is larger than the tree.
    #[error("tree size {size} exceeds the {len} leaves in the tree")]
    SizeOutOfRange {
        /// Requested tree size.
        size: u64,
        /// Number of leaves in the tree.
        len: u64,
    },
    /// A consistency proof was asked from a larger to a smaller tree.
    #[error("first tree size {first} is larger than second tree size {second}")]
    SizesReversed {
        /// First (older) tree size.
        first: u64,
        /// Second (newer) tree size.
        second: u64,
    },
    /// A consistency proof was asked from the empty tree, which RFC 6962 leaves undefined.
    #[error("consistency proofs from the empty tree are not defined")]
    EmptyFirstTree,
}

/// Leaf hashes of complete 256-leaf chunks, supplied by the caller.
pub trait LeafSource {
    /// The `CHUNK_SIZE` leaf hashes of chunk `index`, if the caller has them.
    fn chunk(&self, index: u64) -> Option<&[Hash]>;
}

impl<S: BuildHasher> LeafSource for HashMap<u64, Vec<Hash>, S> {
    fn chunk(&self, index: u64) -> Option<&[Hash]> {
        self.get(&index).map(Vec::as_slice)
    }
}

/// A source with no chunks (for when everything needed is in memory).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLeaves;

impl LeafSource for NoLeaves {
    fn chunk(&self, _index: u64) -> Option<&[Hash]> {
        None
    }
}

/// Largest power of two strictly below `n`; the RFC 6962 split point (`n >= 2`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH over a slice of leaf hashes, straight from the RFC 6962 definition.
fn slice_root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => empty_root(),
        [leaf] => *leaf,
        _ => {
            // Slices here hold at most one chunk, so the split point fits in usize.
            let k = split_point(leaves.len() as u64) as usize;
            let (left, right) = leaves.split_at(k);
            node_hash(&slice_root(left), &slice_root(right))
        }
    }
}

/// Folds the next peak (to the left of everything folded so far) into a root.
fn fold_peak(peak: &Hash, acc: Option<Hash>) -> Hash {
    match acc {
        None => *peak,
        Some(right) => node_hash(peak, &right),
    }
}

/// Append-only RFC 6962 Merkle tree holding O(n / 128) hashes in memory.
#[derive(Clone, Default)]
pub struct MerkleTree {
    len: u64,
    /// `levels[k][i]` is the root of leaves `[i << (CHUNK_LEVEL + k), (i + 1) << (CHUNK_LEVEL + k))`:
    /// every complete aligned subtree from chunk height up, so any perfect
    /// subtree an RFC 6962 recursion asks for is a lookup.
    levels: Vec<Vec<Hash>>,
    /// Leaf hashes of the last, incomplete chunk.
    tail: Vec<Hash>,
    /// Entry `j` is the root of the tail's perfect subtree of `2^j` leaves when
    /// bit `j` of `tail.len()` is set; keeping them makes a chunk root free when
    /// the chunk completes and keeps `root()` at O(log n).
    tail_peaks: [Hash; CHUNK_LEVEL as usize],
}

impl fmt::Debug for MerkleTree {
    // The derived form would print every in-memory hash, which for a large
    // chain is hundreds of megabytes in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MerkleTree")
            .field("len", &self.len)
            .field("root", &hex::encode(self.root()))
            .field("complete_chunks", &chunk_of(self.len))
            .field("tail_leaves", &self.tail.len())
            .finish()
    }
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a leaf hash; amortised one node hash per leaf.
    pub fn push(&mut self, leaf: Hash) {
        if self.tail.capacity() == 0 {
            self.tail.reserve_exact(CHUNK_SIZE as usize);
        }
        // Binary-counter carry over the tail's peaks: each set bit of the old
        // tail length is a peak that merges with the new leaf.
        let mut pending = self.tail.len();
        let mut carry = leaf;
        let mut height = 0;
        while pending & 1 == 1 {
            // `pending < CHUNK_SIZE`, so at most CHUNK_LEVEL bits are set and
            // `height` stays below `tail_peaks.len()` inside the loop.
            carry = node_hash(&self.tail_peaks[height], &carry);
            pending >>= 1;
            height += 1;
        }
        self.len += 1;
        match self.tail_peaks.get_mut(height) {
            Some(slot) => {
                *slot = carry;
                self.tail.push(leaf);
            }
            None => {
                // The carry ran out of the tail: it is the root of a complete chunk.
                self.tail.clear();
                self.push_chunk_root(carry);
            }
        }
    }

    fn push_chunk_root(&mut self, chunk_root: Hash) {
        let mut carry = chunk_root;
        let mut k = 0;
        loop {
            if self.levels.len() == k {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[k];
            level.push(carry);
            if level.len() % 2 == 1 {
                break;
            }
            let [.., left, right] = level.as_slice() else {
                break;
            };
            carry = node_hash(left, right);
            k += 1;
        }
    }

    /// Root at the current size, from memory only.
    pub fn root(&self) -> Hash {
        let mut acc = None;
        let tail_len = self.tail.len();
        for (height, peak) in self.tail_peaks.iter().enumerate() {
            if (tail_len >> height) & 1 == 1 {
                acc = Some(fold_peak(peak, acc));
            }
        }
        // A set bit k of the chunk count means levels[k] has an odd length and
        // its last entry is the unpaired peak of that height.
        let chunks = chunk_of(self.len);
        for (k, level) in self.levels.iter().enumerate() {
            if (chunks >> k) & 1 == 1
                && let Some(peak) = level.last()
            {
                acc = Some(fold_peak(peak, acc));
            }
        }
        acc.unwrap_or_else(empty_root)
    }

    /// Root of the tree made of the first `size` leaves.
    pub fn root_at(&self, size: u64, leaves: &dyn LeafSource) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        if size == self.len {
            return Ok(self.root());
        }
        if size == 0 {
            return Ok(empty_root());
        }
        self.subtree_root(0, size, leaves)
    }

    /// RFC 6962 audit path of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64, leaves: &dyn LeafSource) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(size)?;
        if index >= size {
            return Err(MerkleError::IndexOutOfRange { index, size });
        }
        // Walk PATH(m, D[start:end]) top-down; RFC order is bottom-up.
        let mut path = Vec::new();
        let (mut start, mut end) = (0, size);
        while end - start > 1 {
            let mid = start + split_point(end - start);
            if index < mid {
                path.push(self.subtree_root(mid, end, leaves)?);
                end = mid;
            } else {
                path.push(self.subtree_root(start, mid, leaves)?);
                start = mid;
            }
        }
        path.reverse();
        Ok(path)
    }

    /// RFC 6962 consistency proof between the trees of the first `first` and `second` leaves.
    pub fn consistency_proof(
        &self,
        first: u64,
        second: u64,
        leaves: &dyn LeafSource,
    ) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(second)?;
        if first > second {
            return Err(MerkleError::SizesReversed { first, second });
        }
        if first == 0 {
            return Err(MerkleError::EmptyFirstTree);
        }
        // Walk SUBPROOF(m, D[start:end], whole) top-down; `whole` is the RFC's
        // flag telling whether D[start:end] is still the entire old tree, whose
        // root the verifier already has.
        let mut proof = Vec::new();
        let (mut start, mut end, mut m, mut whole) = (0, second, first, true);
        while m < end - start {
            let mid = start + split_point(end - start);
            if start + m <= mid {
                proof.push(self.subtree_root(mid, end, leaves)?);
                end = mid;
            } else {
                proof.push(self.subtree_root(start, mid, leaves)?);
                m -= mid - start;
                start = mid;
                whole = false;
            }
        }
        if !whole {
            proof.push(self.subtree_root(start, end, leaves)?);
        }
        proof.reverse();
        Ok(proof)
    }

    /// Leaf hash at `index` if it is in the in-memory tail chunk.
    pub fn leaf_in_memory(&self, index: u64) -> Option<Hash> {
        let tail_start = self.len - self.tail.len() as u64;
        let offset = usize::try_from(index.checked_sub(tail_start)?).ok()?;
        self.tail.get(offset).copied()
    }

    /// Checks leaf hashes fetched for chunk `index` against the chunk root in memory.
    ///
    /// Proof functions trust their [`LeafSource`]; running this once per fetched
    /// chunk keeps a corrupt database row from turning into a bad proof.
    pub fn check_chunk(&self, index: u64, leaves: &[Hash]) -> Result<(), MerkleError> {
        let expected = usize::try_from(index)
            .ok()
            .and_then(|i| self.levels.first()?.get(i))
            .ok_or(MerkleError::NoSuchChunk(index))?;
        if leaves.len() as u64 != CHUNK_SIZE {
            return Err(MerkleError::MalformedChunk { index, len: leaves.len() });
        }
        if slice_root(leaves) == *expected { Ok(()) } else { Err(MerkleError::ChunkMismatch(index)) }
    }

    fn check_size(&self, size: u64) -> Result<(), MerkleError> {
        if size > self.len { Err(MerkleError::SizeOutOfRange { size, len: self.len }) } else { Ok(()) }
    }

    /// MTH(D[start:end]) for `start < end <= len`.
    ///
    /// RFC 6962 recursions only ask for perfect aligned subtrees and right-edge
    /// subtrees; perfect ones of chunk size or more are looked up, the rest are
    /// split until they fit in one chunk and are hashed from its leaves.
    fn subtree_root(&self, start: u64, end: u64, leaves: &dyn LeafSource) -> Result<Hash, MerkleError> {
        let size = end - start;
        if size >= CHUNK_SIZE && size.is_power_of_two() && start.is_multiple_of(size) {
            let height = size.trailing_zeros();
            let level = (height - CHUNK_LEVEL) as usize;
            return usize::try_from(start >> height)
                .ok()
                .and_then(|i| self.levels.get(level)?.get(i))
                .copied()
                .ok_or(MerkleError::SizeOutOfRange { size: end, len: self.len });
        }
        let chunk = chunk_of(start);
        if chunk == chunk_of(end - 1) {
            let hashes = self.chunk_leaves(chunk, leaves)?;
            // Both offsets are below CHUNK_SIZE, so the casts are lossless.
            let lo = (start % CHUNK_SIZE) as usize;
            let hi = lo + size as usize;
            return hashes.get(lo..hi).map(slice_root).ok_or(MerkleError::SizeOutOfRange { size: end, len: self.len });
        }
        let mid = start + split_point(size);
        let left = self.subtree_root(start, mid, leaves)?;
        let right = self.subtree_root(mid, end, leaves)?;
        Ok(node_hash(&left, &right))
    }

    fn chunk_leaves<'a>(&'a self, chunk: u64, leaves: &'a dyn LeafSource) -> Result<&'a [Hash], MerkleError> {
        if chunk == chunk_of(self.len) {
            return Ok(&self.tail);
        }
        let hashes = leaves.chunk(chunk).ok_or(MerkleError::MissingChunk(chunk))?;
        if hashes.len() as u64 != CHUNK_SIZE {
            return Err(MerkleError::MalformedChunk { index: chunk, len: hashes.len() });
        }
        Ok(hashes)
    }
}

#[cfg(test)]
mod tests;
