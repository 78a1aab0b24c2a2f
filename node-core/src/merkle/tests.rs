//! Known-answer vectors (transparency-dev/merkle) and property tests against a plain RFC 6962 reference.

use super::json::parse_hash;
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
