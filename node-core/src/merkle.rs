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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// Verifies an RFC 6962 audit path (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            // Skip the levels where this node is a lone right-edge child that
            // RFC 6962 promotes without hashing.
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Verifies an RFC 6962 consistency proof (RFC 9162 section 2.1.4.2).
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    // An old tree that is a perfect subtree is its own first proof node, so
    // the proof omits it.
    let (seed, rest) = if first.is_power_of_two() {
        (first_root, proof)
    } else {
        match proof.split_first() {
            Some(split) => split,
            None => return false,
        }
    };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *first_root && sr == *second_root
}

/// Streaming root computation (a compact frontier of O(log n) hashes) used by chain verification.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    len: u64,
    /// Entry `j` is the root of a perfect subtree of `2^j` leaves when bit `j`
    /// of `len` is set; its length is the bit length of `len`.
    peaks: Vec<Hash>,
}

impl Frontier {
    /// An empty frontier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash; amortised one node hash per leaf.
    pub fn push(&mut self, leaf: Hash) {
        let mut pending = self.len;
        let mut carry = leaf;
        let mut height = 0;
        // Every set bit of `len` is below its bit length, so the index is in range.
        while pending & 1 == 1 {
            carry = node_hash(&self.peaks[height], &carry);
            pending >>= 1;
            height += 1;
        }
        match self.peaks.get_mut(height) {
            Some(slot) => *slot = carry,
            None => self.peaks.push(carry),
        }
        self.len += 1;
    }

    /// Number of leaves pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no leaf was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// RFC 6962 root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut acc = None;
        for (height, peak) in self.peaks.iter().enumerate() {
            if (self.len >> height) & 1 == 1 {
                acc = Some(fold_peak(peak, acc));
            }
        }
        acc.unwrap_or_else(empty_root)
    }
}

fn parse_hash(text: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn parse_hashes(texts: &[String]) -> Option<Vec<Hash>> {
    texts.iter().map(|t| parse_hash(t)).collect()
}

/// JSON shape of an inclusion proof (hex-encoded hashes, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// Zero-based index of the leaf.
    pub leaf_index: u64,
    /// Size of the tree the proof is for.
    pub tree_size: u64,
    /// Leaf hash, hex.
    pub leaf_hash: String,
    /// RFC 6962 audit path, hex, bottom-up.
    pub audit_path: Vec<String>,
    /// Tree root at `tree_size`, hex.
    pub root: String,
}

impl InclusionProof {
    /// Builds the JSON shape from binary hashes.
    pub fn new(leaf_index: u64, tree_size: u64, leaf: &Hash, path: &[Hash], root: &Hash) -> Self {
        Self {
            leaf_index,
            tree_size,
            leaf_hash: hex::encode(leaf),
            audit_path: path.iter().map(hex::encode).collect(),
            root: hex::encode(root),
        }
    }

    /// Parses the hex and runs [`verify_inclusion`]; false on bad hex.
    pub fn verify(&self) -> bool {
        let (Some(leaf), Some(path), Some(root)) =
            (parse_hash(&self.leaf_hash), parse_hashes(&self.audit_path), parse_hash(&self.root))
        else {
            return false;
        };
        verify_inclusion(&leaf, self.leaf_index, self.tree_size, &path, &root)
    }
}

/// JSON shape of a consistency proof (hex-encoded hashes, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    /// Older tree size.
    pub first: u64,
    /// Newer tree size.
    pub second: u64,
    /// RFC 6962 consistency proof, hex.
    pub proof: Vec<String>,
}

impl ConsistencyProof {
    /// Builds the JSON shape from binary hashes.
    pub fn new(first: u64, second: u64, proof: &[Hash]) -> Self {
        Self { first, second, proof: proof.iter().map(hex::encode).collect() }
    }

    /// Parses the hex and runs [`verify_consistency`] against the two roots; false on bad hex.
    pub fn verify(&self, first_root: &Hash, second_root: &Hash) -> bool {
        parse_hashes(&self.proof)
            .is_some_and(|proof| verify_consistency(self.first, self.second, first_root, second_root, &proof))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(text: &str) -> Hash {
        parse_hash(text).expect("test vector is 32 bytes of hex")
    }

    fn hs(texts: &[&str]) -> Vec<Hash> {
        texts.iter().map(|t| h(t)).collect()
    }

    // --- Reference implementation, straight from RFC 6962 section 2.1. ---

    fn k_of(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn ref_mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = k_of(n);
                node_hash(&ref_mth(&d[..k]), &ref_mth(&d[k..]))
            }
        }
    }

    fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = k_of(n);
        if m < k {
            let mut p = ref_path(m, &d[..k]);
            p.push(ref_mth(&d[k..]));
            p
        } else {
            let mut p = ref_path(m - k, &d[k..]);
            p.push(ref_mth(&d[..k]));
            p
        }
    }

    /// Which side each audit path node sits on (true: left of the leaf).
    fn ref_path_sides(m: u64, n: u64) -> Vec<bool> {
        if n <= 1 {
            return Vec::new();
        }
        let k = split_point(n);
        if m < k {
            let mut p = ref_path_sides(m, k);
            p.push(false);
            p
        } else {
            let mut p = ref_path_sides(m - k, n - k);
            p.push(true);
            p
        }
    }

    fn ref_subproof(m: usize, d: &[Hash], whole: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if whole { Vec::new() } else { vec![ref_mth(d)] };
        }
        let k = k_of(n);
        if m <= k {
            let mut p = ref_subproof(m, &d[..k], whole);
            p.push(ref_mth(&d[k..]));
            p
        } else {
            let mut p = ref_subproof(m - k, &d[k..], false);
            p.push(ref_mth(&d[..k]));
            p
        }
    }

    fn ref_proof(m: usize, d: &[Hash]) -> Vec<Hash> {
        ref_subproof(m, d, true)
    }

    fn ref_proof_len(m: u64, n: u64, whole: bool) -> usize {
        if m == n {
            return usize::from(!whole);
        }
        let k = split_point(n);
        if m <= k { ref_proof_len(m, k, whole) + 1 } else { ref_proof_len(m - k, n - k, false) + 1 }
    }

    fn leaves_from_seed(seed: u64, n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| {
                let mut data = seed.to_le_bytes().to_vec();
                data.extend_from_slice(&i.to_le_bytes());
                leaf_hash(&data)
            })
            .collect()
    }

    fn build(leaves: &[Hash]) -> MerkleTree {
        let mut tree = MerkleTree::new();
        for leaf in leaves {
            tree.push(*leaf);
        }
        tree
    }

    /// Every complete chunk, as the database would hold it.
    fn db_of(leaves: &[Hash]) -> HashMap<u64, Vec<Hash>> {
        leaves.chunks_exact(CHUNK_SIZE as usize).enumerate().map(|(i, c)| (i as u64, c.to_vec())).collect()
    }

    fn flipped(proof: &[Hash], at: usize) -> Vec<Hash> {
        let mut bad = proof.to_vec();
        bad[at][at % 32] ^= 0x10;
        bad
    }

    // --- Known answers: transparency-dev/merkle proof/verify_test.go. ---

    fn kat_leaves() -> Vec<Hash> {
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
            .iter()
            .map(|d| leaf_hash(&hex::decode(d).expect("hex leaf data")))
            .collect()
    }

    const KAT_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn known_hashes_and_roots() {
        assert_eq!(empty_root(), h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert_eq!(MerkleTree::new().root(), empty_root());
        assert_eq!(Frontier::new().root(), empty_root());
        let leaves = kat_leaves();
        assert_eq!(leaves[0], h(KAT_ROOTS[0]), "leaf hash of the empty string");
        let mut tree = MerkleTree::new();
        let mut frontier = Frontier::new();
        for (i, leaf) in leaves.iter().enumerate() {
            tree.push(*leaf);
            frontier.push(*leaf);
            assert_eq!(tree.root(), h(KAT_ROOTS[i]), "root of size {}", i + 1);
            assert_eq!(frontier.root(), h(KAT_ROOTS[i]));
        }
        for (i, want) in KAT_ROOTS.iter().enumerate() {
            let size = i as u64 + 1;
            assert_eq!(tree.root_at(size, &NoLeaves), Ok(h(want)));
        }
    }

    #[test]
    fn known_inclusion_proofs() {
        let tree = build(&kat_leaves());
        let leaves = kat_leaves();
        // (zero-based index, size, path); the Go source lists one-based indices.
        let vectors: [(u64, u64, Vec<Hash>); 5] = [
            (0, 1, vec![]),
            (
                0,
                8,
                hs(&[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ]),
            ),
            (
                5,
                8,
                hs(&[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ]),
            ),
            (2, 3, hs(&["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"])),
            (
                1,
                5,
                hs(&[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ]),
            ),
        ];
        for (index, size, want) in vectors {
            let got = tree.inclusion_proof(index, size, &NoLeaves).expect("in-memory proof");
            assert_eq!(got, want, "inclusion proof of {index} in {size}");
            let root = h(KAT_ROOTS[size as usize - 1]);
            let leaf = leaves[index as usize];
            assert!(verify_inclusion(&leaf, index, size, &want, &root));
            let json = InclusionProof::new(index, size, &leaf, &want, &root);
            assert!(json.verify());
            assert!(!verify_inclusion(&leaf, index, size, &want, &empty_root()));
            for at in 0..want.len() {
                assert!(!verify_inclusion(&leaf, index, size, &flipped(&want, at), &root));
            }
        }
    }

    #[test]
    fn known_consistency_proofs() {
        let tree = build(&kat_leaves());
        let vectors: [(u64, u64, Vec<Hash>); 5] = [
            (1, 1, vec![]),
            (
                1,
                8,
                hs(&[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ]),
            ),
            (
                6,
                8,
                hs(&[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ]),
            ),
            (
                2,
                5,
                hs(&[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ]),
            ),
            (
                6,
                7,
                hs(&[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ]),
            ),
        ];
        for (first, second, want) in vectors {
            let got = tree.consistency_proof(first, second, &NoLeaves).expect("in-memory proof");
            assert_eq!(got, want, "consistency proof {first} -> {second}");
            let r1 = h(KAT_ROOTS[first as usize - 1]);
            let r2 = h(KAT_ROOTS[second as usize - 1]);
            assert!(verify_consistency(first, second, &r1, &r2, &want));
            assert!(ConsistencyProof::new(first, second, &want).verify(&r1, &r2));
            if first != second {
                assert!(!verify_consistency(first, second, &r2, &r1, &want));
                assert!(!verify_consistency(first, second, &r1, &r2, &[]));
                for at in 0..want.len() {
                    assert!(!verify_consistency(first, second, &r1, &r2, &flipped(&want, at)));
                }
            }
        }
    }

    // --- Chunk handling. ---

    /// The caller's loop: call, fetch what is missing, retry.
    fn with_fetch<T>(
        db: &HashMap<u64, Vec<Hash>>,
        tree: &MerkleTree,
        mut call: impl FnMut(&HashMap<u64, Vec<Hash>>) -> Result<T, MerkleError>,
    ) -> (T, Vec<u64>) {
        let mut cache = HashMap::new();
        let mut fetched = Vec::new();
        loop {
            match call(&cache) {
                Err(MerkleError::MissingChunk(i)) => {
                    assert!(!fetched.contains(&i), "chunk {i} asked for twice");
                    let chunk = db.get(&i).expect("chunk exists in db").clone();
                    tree.check_chunk(i, &chunk).expect("db chunk matches");
                    cache.insert(i, chunk);
                    fetched.push(i);
                }
                other => return (other.expect("succeeds once chunks are loaded"), fetched),
            }
        }
    }

    #[test]
    fn missing_chunk_is_reported_and_supplying_it_succeeds() {
        let leaves = leaves_from_seed(7, 1000); // chunks 0..=2 complete, 232 in the tail
        let tree = build(&leaves);
        let db = db_of(&leaves);

        assert_eq!(tree.inclusion_proof(10, 1000, &NoLeaves), Err(MerkleError::MissingChunk(0)));
        let mut one = HashMap::new();
        one.insert(0, db[&0].clone());
        assert_eq!(tree.inclusion_proof(10, 1000, &one), Ok(ref_path(10, &leaves)));

        assert_eq!(tree.root_at(300, &NoLeaves), Err(MerkleError::MissingChunk(1)));
        let (root, fetched) = with_fetch(&db, &tree, |src| tree.root_at(300, src));
        assert_eq!(root, ref_mth(&leaves[..300]));
        assert_eq!(fetched, vec![1]);

        let (proof, fetched) = with_fetch(&db, &tree, |src| tree.consistency_proof(300, 700, src));
        assert_eq!(proof, ref_proof(300, &leaves[..700]));
        assert_eq!(fetched.len(), 2, "the chunks holding leaves 299 and 699");

        // Everything at the current size beyond whole chunks is in memory.
        assert_eq!(tree.root_at(1000, &NoLeaves), Ok(ref_mth(&leaves)));
        assert_eq!(tree.inclusion_proof(900, 1000, &NoLeaves), Ok(ref_path(900, &leaves)));
        assert_eq!(tree.consistency_proof(768, 1000, &NoLeaves), Ok(ref_proof(768, &leaves)));
        assert_eq!(tree.root_at(512, &NoLeaves), Ok(ref_mth(&leaves[..512])));
    }

    #[test]
    fn bad_chunks_are_errors_not_panics() {
        let leaves = leaves_from_seed(8, 600);
        let tree = build(&leaves);
        let mut short = HashMap::new();
        short.insert(0, leaves[..255].to_vec());
        assert_eq!(tree.inclusion_proof(3, 600, &short), Err(MerkleError::MalformedChunk { index: 0, len: 255 }));
        assert_eq!(tree.check_chunk(0, &leaves[..255]), Err(MerkleError::MalformedChunk { index: 0, len: 255 }));
        assert_eq!(tree.check_chunk(1, &leaves[256..512]), Ok(()));
        assert_eq!(tree.check_chunk(1, &leaves[0..256]), Err(MerkleError::ChunkMismatch(1)));
        assert_eq!(tree.check_chunk(2, &leaves[0..256]), Err(MerkleError::NoSuchChunk(2)));
        assert_eq!(tree.check_chunk(u64::MAX, &leaves[0..256]), Err(MerkleError::NoSuchChunk(u64::MAX)));
    }

    #[test]
    fn argument_errors() {
        let tree = build(&leaves_from_seed(9, 300));
        let size_err = |size| MerkleError::SizeOutOfRange { size, len: 300 };
        assert_eq!(tree.root_at(301, &NoLeaves), Err(size_err(301)));
        assert_eq!(tree.root_at(u64::MAX, &NoLeaves), Err(size_err(u64::MAX)));
        assert_eq!(tree.root_at(0, &NoLeaves), Ok(empty_root()));
        assert_eq!(tree.inclusion_proof(0, 301, &NoLeaves), Err(size_err(301)));
        assert_eq!(
            tree.inclusion_proof(u64::MAX, 300, &NoLeaves),
            Err(MerkleError::IndexOutOfRange { index: u64::MAX, size: 300 })
        );
        assert_eq!(tree.inclusion_proof(0, 0, &NoLeaves), Err(MerkleError::IndexOutOfRange { index: 0, size: 0 }));
        assert_eq!(tree.consistency_proof(1, u64::MAX, &NoLeaves), Err(size_err(u64::MAX)));
        assert_eq!(
            tree.consistency_proof(200, 100, &NoLeaves),
            Err(MerkleError::SizesReversed { first: 200, second: 100 })
        );
        assert_eq!(tree.consistency_proof(0, 100, &NoLeaves), Err(MerkleError::EmptyFirstTree));
        assert_eq!(tree.consistency_proof(300, 300, &NoLeaves), Ok(vec![]));
        assert_eq!(tree.consistency_proof(100, 100, &NoLeaves), Ok(vec![]));
        assert_eq!(
            MerkleTree::new().inclusion_proof(0, 0, &NoLeaves),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        );

        let any = empty_root();
        assert!(!verify_inclusion(&any, 0, 0, &[], &any));
        assert!(!verify_inclusion(&any, u64::MAX, u64::MAX, &[any], &any));
        assert!(!verify_consistency(0, 0, &any, &any, &[]));
        assert!(!verify_consistency(0, 5, &any, &any, &[]));
        assert!(!verify_consistency(5, 4, &any, &any, &[any]));
        assert!(!verify_consistency(3, 3, &any, &any, &[any]));
        assert!(!verify_consistency(1, u64::MAX, &any, &any, &[any; 70]));
        assert!(!verify_consistency(u64::MAX - 1, u64::MAX, &any, &any, &[any; 70]));
    }

    #[test]
    fn leaf_in_memory_covers_exactly_the_tail() {
        let leaves = leaves_from_seed(10, 600);
        let mut tree = build(&leaves);
        assert_eq!(tree.leaf_in_memory(511), None);
        assert_eq!(tree.leaf_in_memory(512), Some(leaves[512]));
        assert_eq!(tree.leaf_in_memory(599), Some(leaves[599]));
        assert_eq!(tree.leaf_in_memory(600), None);
        assert_eq!(tree.leaf_in_memory(u64::MAX), None);
        assert_eq!(MerkleTree::new().leaf_in_memory(0), None);
        for leaf in leaves_from_seed(11, 168) {
            tree.push(leaf);
        }
        assert_eq!(tree.len(), 768);
        assert_eq!(tree.leaf_in_memory(767), None, "a full chunk leaves memory");
    }

    #[test]
    fn frontier_matches_tree_at_every_size() {
        let leaves = leaves_from_seed(12, 1100);
        let mut tree = MerkleTree::new();
        let mut frontier = Frontier::new();
        assert!(tree.is_empty() && frontier.is_empty());
        for (i, leaf) in leaves.iter().enumerate() {
            tree.push(*leaf);
            frontier.push(*leaf);
            assert_eq!(frontier.len(), tree.len());
            assert_eq!(frontier.root(), tree.root(), "size {}", i + 1);
        }
        let db = db_of(&leaves);
        for size in 0..=leaves.len() {
            assert_eq!(tree.root_at(size as u64, &db), Ok(ref_mth(&leaves[..size])), "historic root at {size}");
        }
    }

    #[test]
    fn json_shapes() {
        let leaves = kat_leaves();
        let tree = build(&leaves);
        let path = tree.inclusion_proof(5, 8, &NoLeaves).expect("in-memory proof");
        let proof = InclusionProof::new(5, 8, &leaves[5], &path, &tree.root());
        let json = serde_json::to_value(&proof).expect("serialise");
        assert_eq!(json["leaf_index"], 5);
        assert_eq!(json["tree_size"], 8);
        assert_eq!(json["root"], KAT_ROOTS[7]);
        assert_eq!(json["audit_path"][0], "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b");
        let back: InclusionProof = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back, proof);
        assert!(back.verify());

        let mut bad = proof.clone();
        bad.root = "zz".repeat(32);
        assert!(!bad.verify());
        let mut bad = proof.clone();
        bad.audit_path[1].pop();
        assert!(!bad.verify());
        let mut bad = proof;
        bad.leaf_index = 4;
        assert!(!bad.verify());

        let cons = ConsistencyProof::new(6, 8, &tree.consistency_proof(6, 8, &NoLeaves).expect("in-memory proof"));
        let json = serde_json::to_string(&cons).expect("serialise");
        assert!(json.starts_with(r#"{"first":6,"second":8,"proof":["0ebc5d34"#));
        let back: ConsistencyProof = serde_json::from_str(&json).expect("deserialise");
        assert!(back.verify(&h(KAT_ROOTS[5]), &h(KAT_ROOTS[7])));
        assert!(!back.verify(&h(KAT_ROOTS[4]), &h(KAT_ROOTS[7])));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn matches_rfc_reference(
            n in 1u64..2000,
            seed in any::<u64>(),
            picks in proptest::collection::vec(any::<(u64, u64, u64)>(), 4),
        ) {
            let leaves = leaves_from_seed(seed, n);
            let tree = build(&leaves);
            let db = db_of(&leaves);
            prop_assert_eq!(tree.len(), n);
            prop_assert_eq!(tree.root(), ref_mth(&leaves));

            for (a, b, c) in picks {
                let size = 1 + a % n;
                let d = &leaves[..size as usize];
                let root = ref_mth(d);
                prop_assert_eq!(tree.root_at(size, &db), Ok(root));

                // Inclusion.
                let index = b % size;
                let leaf = d[index as usize];
                let path = tree.inclusion_proof(index, size, &db).expect("proof");
                prop_assert_eq!(&path, &ref_path(index as usize, d));
                prop_assert!(verify_inclusion(&leaf, index, size, &path, &root));
                for at in 0..path.len() {
                    prop_assert!(!verify_inclusion(&leaf, index, size, &flipped(&path, at), &root));
                }
                let mut bad_leaf = leaf;
                bad_leaf[0] ^= 1;
                prop_assert!(!verify_inclusion(&bad_leaf, index, size, &path, &root));
                prop_assert!(!verify_inclusion(&leaf, index, size, &path, &leaf_hash(b"other")));
                let wrong_index = (index + 1 + c % size.max(2)) % size;
                if wrong_index != index {
                    prop_assert!(!verify_inclusion(&leaf, wrong_index, size, &path, &root));
                }
                // A size with the same path shape gives the same computation,
                // so only a differently shaped size must fail.
                let wrong_size = 1 + c % (2 * n);
                let same_shape = ref_path_sides(index, wrong_size) == ref_path_sides(index, size);
                if wrong_size != size && index < wrong_size {
                    prop_assert_eq!(
                        verify_inclusion(&leaf, index, wrong_size, &path, &root),
                        same_shape
                    );
                }
                prop_assert!(!verify_inclusion(&leaf, index, index, &path, &root));

                // Consistency.
                let first = 1 + c % size;
                let first_root = ref_mth(&d[..first as usize]);
                let proof = tree.consistency_proof(first, size, &db).expect("proof");
                prop_assert_eq!(&proof, &ref_proof(first as usize, d));
                prop_assert!(verify_consistency(first, size, &first_root, &root, &proof));
                if first != size {
                    for at in 0..proof.len() {
                        prop_assert!(!verify_consistency(first, size, &first_root, &root, &flipped(&proof, at)));
                    }
                    prop_assert!(!verify_consistency(first, size, &root, &first_root, &proof));
                    prop_assert!(!verify_consistency(first, size, &first_root, &leaf_hash(b"x"), &proof));
                    for (f, s) in [(first + 1, size), (first - 1, size), (first, size + 1), (first, size - 1), (first, 2 * size)] {
                        if (f, s) != (first, size)
                            && f >= 1
                            && f < s
                            && ref_proof_len(f, s, true) != proof.len()
                        {
                            prop_assert!(!verify_consistency(f, s, &first_root, &root, &proof));
                        }
                    }
                }
            }
        }
    }
}
