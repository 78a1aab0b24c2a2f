//! The anchoring contract run by pytezos's Michelson interpreter: who may anchor, that
//! anchors only move forward per chain name, that the root is 32 bytes, that no tez is taken,
//! and the event each anchor emits.

use kalima_bridge_tezos::ANCHOR_CONTRACT;
use serde_json::{Value, json};

use crate::support::pytezos;

const ADMIN: &str = "tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL";
const OTHER: &str = "tz1fRryceCL4hCAGhoKiNm8oUqA54ZBFuHGV";

/// What a call must end with.
enum Expect {
    /// Applied, leaving this `last` map (chain name hex -> tree size) and this admin.
    Stored { admin: &'static str, last: Value },
    /// Refused with this FAILWITH string.
    Fails(&'static str),
}

struct Scenario {
    name: &'static str,
    sender: &'static str,
    amount: u64,
    entrypoint: &'static str,
    arg: Value,
    last: Value,
    expect: Expect,
}

fn anchor(chain: &str, tree_size: u64, root_len: usize, height: u64) -> Value {
    json!({"chain": hex::encode(chain), "tree_size": tree_size, "root": "ab".repeat(root_len), "height": height})
}

fn scenarios() -> Vec<Scenario> {
    let dev = hex::encode("dev");
    let usine = hex::encode("usine-é");
    vec![
        Scenario {
            name: "first anchor of a chain is accepted",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 10, 32, 3),
            last: json!({}),
            expect: Expect::Stored { admin: ADMIN, last: json!({ dev.clone(): 10 }) },
        },
        Scenario {
            name: "a newer anchor moves forward",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 11, 32, 4),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Stored { admin: ADMIN, last: json!({ dev.clone(): 11 }) },
        },
        Scenario {
            name: "chain names are kept apart (UTF-8 name)",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("usine-é", 1, 32, 1),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Stored { admin: ADMIN, last: json!({ dev.clone(): 10, usine: 1 }) },
        },
        Scenario {
            name: "a non-admin is refused",
            sender: OTHER,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 11, 32, 4),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Fails("NOT_ADMIN"),
        },
        Scenario {
            name: "the same tree size is refused",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 10, 32, 4),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Fails("TREE_SIZE_NOT_NEWER"),
        },
        Scenario {
            name: "an older tree size is refused",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 9, 32, 4),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Fails("TREE_SIZE_NOT_NEWER"),
        },
        Scenario {
            name: "a 31-byte root is refused",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 11, 31, 4),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Fails("ROOT_NOT_32_BYTES"),
        },
        Scenario {
            name: "a 33-byte root is refused",
            sender: ADMIN,
            amount: 0,
            entrypoint: "anchor",
            arg: anchor("dev", 11, 33, 4),
            last: json!({}),
            expect: Expect::Fails("ROOT_NOT_32_BYTES"),
        },
        Scenario {
            name: "tez sent along is refused",
            sender: ADMIN,
            amount: 1,
            entrypoint: "anchor",
            arg: anchor("dev", 11, 32, 4),
            last: json!({}),
            expect: Expect::Fails("AMOUNT_NOT_ZERO"),
        },
        Scenario {
            name: "the admin hands over",
            sender: ADMIN,
            amount: 0,
            entrypoint: "set_admin",
            arg: json!(OTHER),
            last: json!({ dev.clone(): 10 }),
            expect: Expect::Stored { admin: OTHER, last: json!({ dev.clone(): 10 }) },
        },
        Scenario {
            name: "a non-admin cannot take over",
            sender: OTHER,
            amount: 0,
            entrypoint: "set_admin",
            arg: json!(OTHER),
            last: json!({}),
            expect: Expect::Fails("NOT_ADMIN"),
        },
    ]
}

#[test]
fn anchoring_contract_in_the_pytezos_interpreter() {
    let scenarios = scenarios();
    let request = json!({
        "code": ANCHOR_CONTRACT,
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name,
            "entrypoint": s.entrypoint,
            "arg": s.arg,
            "storage": {"admin": ADMIN, "last": s.last},
            "sender": s.sender,
            "amount": s.amount,
        })).collect::<Vec<_>>(),
    });
    let answers = pytezos("contract", &request);
    let answers = answers.as_array().expect("a list of answers");
    assert_eq!(answers.len(), scenarios.len());
    for (s, a) in scenarios.iter().zip(answers) {
        assert!(a["error"].is_null(), "{}: pytezos could not run it: {}", s.name, a["error"]);
        match &s.expect {
            Expect::Stored { admin, last } => {
                assert_eq!(a["ok"], true, "{}: refused with {}", s.name, a["failwith"]);
                assert_eq!(a["storage"]["admin"], *admin, "{}", s.name);
                assert_eq!(a["storage"]["last"], *last, "{}", s.name);
                if s.entrypoint == "anchor" {
                    // One event, tagged %anchored, carrying the whole checkpoint.
                    let events = a["events"].as_array().unwrap();
                    assert_eq!(events.len(), 1, "{}: {events:?}", s.name);
                    assert_eq!(events[0]["tag"], "anchored");
                    let payload = events[0]["payload"].to_string();
                    for field in ["chain", "root"] {
                        let v = s.arg[field].as_str().unwrap();
                        assert!(payload.contains(v), "{}: event {payload} lacks {field} {v}", s.name);
                    }
                    for field in ["tree_size", "height"] {
                        let v = format!("\"{}\"", s.arg[field]);
                        assert!(payload.contains(&v), "{}: event {payload} lacks {field} {v}", s.name);
                    }
                } else {
                    assert_eq!(a["events"], json!([]), "{}", s.name);
                }
            }
            Expect::Fails(with) => {
                assert_eq!(a["ok"], false, "{}: applied, storage {}", s.name, a["storage"]);
                assert_eq!(a["failwith"], *with, "{}", s.name);
            }
        }
    }
}
