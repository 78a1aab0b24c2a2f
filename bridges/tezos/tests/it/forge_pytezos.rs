//! Our forged bytes, operation hashes and signatures against pytezos's, byte for byte, for a
//! table of operation groups crossing the zarith byte boundaries, with and without a reveal,
//! with short, long and non-ASCII chain names, and several contracts and keys.

use kalima_bridge_tezos::AnchorParameter;
use kalima_bridge_tezos::forge::{Content, ManagerFields, Micheline, OperationGroup, Parameters, SignedOperation};
use kalima_bridge_tezos::keys::{TezosKey, verify_forged};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tezos_crypto_rs::hash::{BlockHash, ContractKt1Hash, HashTrait};

use crate::support::pytezos;

/// Values on both sides of every zarith byte boundary up to 64 bits.
const NUMBERS: [u64; 14] =
    [0, 1, 63, 64, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 4_294_967_295, (1 << 56) - 1, 1 << 56, u64::MAX];

struct Case {
    name: String,
    key: TezosKey,
    group: OperationGroup,
}

fn chain_names() -> Vec<String> {
    vec![
        String::new(),
        "a".into(),
        "plant-1".into(),
        "usine-é".into(),
        "工場-東京".into(),
        "🏭 line 2\nsecond line".into(),
        "x".repeat(300),
        "é".repeat(200),
    ]
}

fn cases() -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(0x7e205);
    let contracts: Vec<ContractKt1Hash> = (0..5)
        .map(|_| ContractKt1Hash::try_from_bytes(&rng.r#gen::<[u8; 20]>()).expect("20 bytes"))
        .chain([ContractKt1Hash::from_b58check("KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi").expect("a KT1")])
        .collect();
    let chains = chain_names();
    let n = NUMBERS.len();
    let mut out = Vec::new();
    for i in 0..48 {
        let key = TezosKey::from_seed(rng.r#gen());
        let manager = |fee, counter, gas_limit, storage_limit| ManagerFields {
            source: key.address().clone(),
            fee,
            counter,
            gas_limit,
            storage_limit,
        };
        let p = AnchorParameter {
            chain: chains[i % chains.len()].clone(),
            tree_size: NUMBERS[(i + 1) % n],
            root: rng.r#gen(),
            height: NUMBERS[(i + 9) % n],
        };
        let mut contents = Vec::new();
        let counter = NUMBERS[(i + 3) % n].min(u64::MAX - 1);
        let with_reveal = i % 2 == 0;
        if with_reveal {
            contents.push(Content::Reveal {
                manager: manager(NUMBERS[(i + 2) % n], counter, NUMBERS[(i + 4) % n], NUMBERS[(i + 6) % n]),
                public_key: key.public_key().clone(),
            });
        }
        contents.push(Content::Transaction {
            manager: manager(
                NUMBERS[i % n],
                counter + u64::from(with_reveal),
                NUMBERS[(i + 5) % n],
                NUMBERS[(i + 7) % n],
            ),
            amount: if i % 7 == 3 { NUMBERS[(i + 11) % n] } else { 0 },
            destination: contracts[i % contracts.len()].clone(),
            parameters: Some(Parameters { entrypoint: "anchor".into(), value: p.to_micheline() }),
        });
        out.push(Case {
            name: format!("#{i} reveal={with_reveal} chain={:?}", p.chain.chars().take(12).collect::<String>()),
            key,
            group: OperationGroup {
                branch: BlockHash::try_from_bytes(&rng.r#gen::<[u8; 32]>()).expect("32 bytes"),
                contents,
            },
        });
    }
    // Other shapes of a call: reserved and long entrypoint names, no parameters, a flat comb.
    let key = TezosKey::from_seed([42; 32]);
    let m = ManagerFields {
        source: key.address().clone(),
        fee: 1_420,
        counter: 27_654_321,
        gas_limit: 2_051,
        storage_limit: 91,
    };
    let value = Micheline::Prim {
        prim: "Pair".into(),
        args: vec![
            Micheline::Bytes(b"dev".to_vec()),
            Micheline::int(5u64),
            Micheline::Bytes(vec![7; 32]),
            Micheline::int(2u64),
        ],
        annots: vec![],
    };
    for (name, parameters) in [
        ("default entrypoint", Some(Parameters { entrypoint: "default".into(), value: value.clone() })),
        ("do entrypoint", Some(Parameters { entrypoint: "do".into(), value: value.clone() })),
        ("31-byte entrypoint", Some(Parameters { entrypoint: "a".repeat(31), value })),
        ("no parameters", None),
    ] {
        out.push(Case {
            name: name.into(),
            key: key.clone(),
            group: OperationGroup {
                branch: BlockHash::try_from_bytes(&[3; 32]).expect("32 bytes"),
                contents: vec![Content::Transaction {
                    manager: m.clone(),
                    amount: 1,
                    destination: contracts[0].clone(),
                    parameters,
                }],
            },
        });
    }
    out
}

fn first_difference(a: &str, b: &str) -> String {
    let i = a.bytes().zip(b.bytes()).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    format!("first difference at byte {} (ours {} hex chars, pytezos {})", i / 2, a.len(), b.len())
}

#[test]
fn forged_bytes_hashes_and_signatures_match_pytezos() {
    let cases = cases();
    let signed: Vec<SignedOperation> = cases.iter().map(|c| c.key.sign(c.group.clone()).unwrap()).collect();
    let request = json!({
        "cases": cases.iter().zip(&signed).map(|(c, s)| json!({
            "name": c.name,
            "operation": c.group.to_json(None),
            "signature": hex::encode(s.signature),
            "public_key": c.key.public_key_b58(),
        })).collect::<Vec<_>>(),
    });
    let answers = pytezos("forge", &request);
    let answers = answers.as_array().expect("a list of answers");
    assert_eq!(answers.len(), cases.len());

    let mut failures = Vec::new();
    for ((case, s), a) in cases.iter().zip(&signed).zip(answers) {
        if let Some(e) = a["error"].as_str() {
            failures.push(format!("{}: pytezos: {e}", case.name));
            continue;
        }
        let ours = hex::encode(&s.forged);
        let theirs = a["forged"].as_str().unwrap_or_default();
        if ours != theirs {
            failures.push(format!(
                "{}: forged bytes differ, {}\n ours    {ours}\n pytezos {theirs}",
                case.name,
                first_difference(&ours, theirs)
            ));
        }
        let hash = s.hash().to_b58check();
        if a["hash"] != Value::String(hash.clone()) {
            failures.push(format!("{}: operation hash ours {hash}, pytezos {}", case.name, a["hash"]));
        }
        if a["signature_ok"] != Value::Bool(true) {
            failures.push(format!("{}: pytezos does not verify our signature", case.name));
        }
        // Our own reading of the signed bytes gives back what was signed.
        let back = SignedOperation::unforge(&s.bytes()).unwrap();
        assert_eq!(back, *s, "{}: decoding our own bytes", case.name);
        assert!(verify_forged(case.key.public_key(), &s.forged, &s.signature));
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from pytezos:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn a_tampered_signature_is_refused_by_pytezos() {
    let case = cases().remove(1);
    let mut s = case.key.sign(case.group.clone()).unwrap();
    s.signature[10] ^= 1;
    let answers = pytezos(
        "forge",
        &json!({"cases": [{
            "name": "tampered",
            "operation": case.group.to_json(None),
            "signature": hex::encode(s.signature),
            "public_key": case.key.public_key_b58(),
        }]}),
    );
    assert_eq!(answers[0]["signature_ok"], Value::Bool(false), "{answers}");
    assert!(!verify_forged(case.key.public_key(), &s.forged, &s.signature));
}
