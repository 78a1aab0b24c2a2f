//! Ingest, the write path every front door shares: token -> device, then the DESIGN.md checks
//! in order (known and not revoked, write grant, size, signature, idempotency key), each
//! refusal a `Rejection` with its stable code and nothing written.

use ed25519_dalek::{Signer, SigningKey};
use kalima_core::Ingest;
use kalima_core::chain::Guard;
use kalima_core::registry::{DEVICES_ADDRESS, DeviceRecord, token_digest};
use kalima_core::tx::{MAX_BODY, TxContent};
use kalima_core::{Error, Rejection};

use crate::common::{ADMIN_TOKEN, TestDb, backend_tests, device_registration, put, register_device};

backend_tests!(ingest_checks_in_order, idempotency_keys_older_than_the_window_are_still_refused);

struct Case {
    name: &'static str,
    token: Option<&'static str>,
    items: Vec<TxContent>,
    /// `Ok` or the rejection code.
    expect: Result<(), &'static str>,
}

fn signed(key: &SigningKey, mut c: TxContent) -> TxContent {
    if c.idempotency_key.is_empty() {
        c.idempotency_key = format!("sig-{}", hex::encode(&c.body));
    }
    c.signature = Some(key.sign(&c.signing_bytes(crate::common::CHAIN)).to_bytes());
    c
}

async fn ingest_checks_in_order(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    register_device(chain, "sensor-1", "s1-token", &[("/plant-1", true, true)]).await;
    register_device(chain, "reader", "ro-token", &[("/plant-1", true, false)]).await;
    register_device(chain, "old", "old-token", &[("/plant-1", true, true)]).await;
    let sk = SigningKey::from_bytes(&[3; 32]);
    chain
        .submit(
            vec![
                device_registration(
                    "signer",
                    "sig-token",
                    false,
                    Some(hex::encode(sk.verifying_key().as_bytes())),
                    true,
                ),
                crate::common::grant("signer", "/plant-2", false, true),
            ],
            Some(Guard::DeviceAbsent("signer".into())),
        )
        .await
        .unwrap();
    // Revocation is a new record for the device.
    let revoked = DeviceRecord {
        token_sha256: token_digest("old-token"),
        public_key: None,
        require_signature: false,
        admin: false,
        revoked: true,
    };
    let revoke = TxContent { body: serde_json::to_vec(&revoked).unwrap(), ..put("admin", DEVICES_ADDRESS, "old", b"") };
    chain.submit(vec![revoke], Some(Guard::DevicePresent("old".into()))).await.unwrap();

    let ingest = Ingest::new(chain.clone(), MAX_BODY);
    let sig_put = |body: &[u8]| put("signer", "/plant-2/press", "force", body);
    let mut bad_sig = signed(&sk, sig_put(b"100"));
    bad_sig.body = b"999".to_vec();
    let cases = vec![
        Case {
            name: "admin writes anywhere",
            token: Some(ADMIN_TOKEN),
            items: vec![put("x", "/plant-9/a", "k", b"1")],
            expect: Ok(()),
        },
        Case {
            name: "grant covers the address",
            token: Some("s1-token"),
            items: vec![put("admin", "/plant-1/line-2", "temp", b"21.5")],
            expect: Ok(()),
        },
        Case {
            name: "batch under the grant",
            token: Some("s1-token"),
            items: vec![put("", "/plant-1", "a", b"1"), put("", "/plant-1/x", "b", b"2")],
            expect: Ok(()),
        },
        Case {
            name: "no token",
            token: None,
            items: vec![put("", "/plant-1", "a", b"1")],
            expect: Err("unknown_device"),
        },
        Case {
            name: "unknown token",
            token: Some("nope"),
            items: vec![put("", "/plant-1", "a", b"1")],
            expect: Err("unknown_device"),
        },
        Case {
            name: "revoked device",
            token: Some("old-token"),
            items: vec![put("", "/plant-1", "a", b"1")],
            expect: Err("revoked_device"),
        },
        Case {
            name: "prefix stops at a segment",
            token: Some("s1-token"),
            items: vec![put("", "/plant-10", "a", b"1")],
            expect: Err("forbidden"),
        },
        Case {
            name: "read-only grant",
            token: Some("ro-token"),
            items: vec![put("", "/plant-1", "a", b"1")],
            expect: Err("forbidden"),
        },
        Case {
            name: "system address, device",
            token: Some("s1-token"),
            items: vec![put("", DEVICES_ADDRESS, "evil", b"{}")],
            expect: Err("forbidden"),
        },
        Case {
            name: "system address, admin",
            token: Some(ADMIN_TOKEN),
            items: vec![put("", DEVICES_ADDRESS, "evil", b"{}")],
            expect: Err("forbidden"),
        },
        Case {
            name: "one bad item refuses the batch",
            token: Some("s1-token"),
            items: vec![put("", "/plant-1", "ok", b"1"), put("", "/plant-3", "no", b"1")],
            expect: Err("forbidden"),
        },
        Case {
            name: "body over the limit",
            token: Some("s1-token"),
            items: vec![put("", "/plant-1", "big", &vec![b'x'; MAX_BODY + 1])],
            expect: Err("too_large"),
        },
        Case {
            name: "body at the limit",
            token: Some("s1-token"),
            items: vec![put("", "/plant-1", "big", &vec![b'x'; MAX_BODY])],
            expect: Ok(()),
        },
        Case {
            name: "bad key",
            token: Some("s1-token"),
            items: vec![put("", "/plant-1", "a#b", b"1")],
            expect: Err("invalid_key"),
        },
        Case {
            name: "bad address",
            token: Some("s1-token"),
            items: vec![put("", "plant-1", "a", b"1")],
            expect: Err("invalid_address"),
        },
        Case { name: "empty batch", token: Some("s1-token"), items: vec![], expect: Err("batch_size") },
        Case {
            name: "unsigned from a signing device",
            token: Some("sig-token"),
            items: vec![sig_put(b"100")],
            expect: Err("signature_required"),
        },
        Case {
            name: "altered signed content",
            token: Some("sig-token"),
            items: vec![bad_sig],
            expect: Err("bad_signature"),
        },
        Case {
            name: "signed content",
            token: Some("sig-token"),
            items: vec![signed(&sk, sig_put(b"100"))],
            expect: Ok(()),
        },
        Case {
            name: "signature from a device without a key",
            token: Some("s1-token"),
            items: vec![signed(&sk, put("sensor-1", "/plant-1", "s", b"1"))],
            expect: Err("bad_signature"),
        },
        Case {
            name: "new idempotency key",
            token: Some("s1-token"),
            items: vec![TxContent { idempotency_key: "r-1".into(), ..put("", "/plant-1", "i", b"1") }],
            expect: Ok(()),
        },
        Case {
            name: "repeated idempotency key",
            token: Some("s1-token"),
            items: vec![TxContent { idempotency_key: "r-1".into(), ..put("", "/plant-1", "i", b"2") }],
            expect: Err("duplicate_idempotency_key"),
        },
    ];

    for case in cases {
        let size = chain.tree_size();
        let n = case.items.len() as u64;
        let res: Result<Vec<kalima_core::Receipt>, Rejection> = async {
            let device = ingest.authenticate("test", case.token)?;
            match ingest.write("test", &device, case.items.clone()).await {
                Ok(r) => Ok(r.into_receipts()),
                Err(Error::Rejected(r)) => Err(r),
                Err(e) => panic!("{}: not a rejection: {e:#}", case.name),
            }
        }
        .await;
        match (&res, case.expect) {
            (Ok(receipts), Ok(())) => {
                assert_eq!(receipts.len() as u64, n, "{}", case.name);
                assert_eq!(chain.tree_size(), size + n, "{}", case.name);
                let device = ingest.authenticate("test", case.token).unwrap();
                for (r, item) in receipts.iter().zip(&case.items) {
                    let stored = chain.store().tx_by_id(&r.id).await.unwrap().expect("stored");
                    assert_eq!(
                        stored.tx.content.device_id, device.id,
                        "{}: the writer is who authenticated",
                        case.name
                    );
                    assert_eq!(stored.tx.content.body, item.body, "{}", case.name);
                }
            }
            (Err(rej), Err(code)) => {
                assert_eq!(rej.code(), code, "{}: {rej}", case.name);
                assert_eq!(chain.tree_size(), size, "{}: a rejection writes nothing", case.name);
            }
            (got, want) => panic!("{}: expected {want:?}, got {got:?}", case.name),
        }
    }
}

/// Only the most recent idempotency keys stay in memory; a key that fell out of the window,
/// or was written before a restart beyond the window, is still refused (from the store).
async fn idempotency_keys_older_than_the_window_are_still_refused(db: TestDb) {
    let config = kalima_core::ChainConfig { idempotency_window: 2, ..crate::common::test_config() };
    let c = db.chain_with(config.clone()).await;
    register_device(&c.chain, "idem", "kal_idem", &[("/w", true, true)]).await;
    let ingest = Ingest::new(c.chain.clone(), MAX_BODY);
    let device = c.chain.registry().get("idem").unwrap();
    let with_key = |k: &str| TxContent { idempotency_key: k.into(), ..put("idem", "/w", "v", k.as_bytes()) };
    let mut ids = Vec::new();
    for k in ["k1", "k2", "k3"] {
        ids.push(ingest.write("test", &device, vec![with_key(k)]).await.unwrap().receipts()[0].id);
    }
    assert_eq!(c.chain.idempotency_hit("idem", "k1"), None, "k1 fell out of the window");
    let refused = |r: Result<Vec<kalima_core::Receipt>, Error>, id: [u8; 32]| match r {
        Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { existing, .. })) => {
            assert_eq!(existing, hex::encode(id))
        }
        other => panic!("an old idempotency key was accepted: {other:?}"),
    };
    refused(ingest.write("test", &device, vec![with_key("k1")]).await.map(|w| w.into_receipts()), ids[0]);
    refused(ingest.write("test", &device, vec![with_key("k3")]).await.map(|w| w.into_receipts()), ids[2]);
    ingest.write("test", &device, vec![with_key("k4")]).await.unwrap();
    // Straight to the sequencer (as a write queued before k1 fell out of memory would be):
    // it must refuse the old key itself rather than let the unique index fail the commit.
    match c.chain.submit(vec![with_key("k1")], None).await {
        Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { existing, .. })) => {
            assert_eq!(existing, hex::encode(ids[0]))
        }
        other => panic!("the sequencer accepted an old idempotency key: {other:?}"),
    }
    ingest.write("test", &device, vec![with_key("k5")]).await.expect("the chain still commits");
    c.stop().await;

    // After a restart only the window is loaded; the rest is still refused.
    let c = db.chain_with(config).await;
    let ingest = Ingest::new(c.chain.clone(), MAX_BODY);
    let device = c.chain.registry().get("idem").unwrap();
    assert_eq!(c.chain.idempotency_hit("idem", "k2"), None);
    refused(ingest.write("test", &device, vec![with_key("k2")]).await.map(|w| w.into_receipts()), ids[1]);
    c.stop().await;
}
