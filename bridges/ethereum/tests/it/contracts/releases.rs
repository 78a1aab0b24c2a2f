//! Threshold-signed releases: the digest, paying exactly once, expiry, and every rejected
//! authorisation (signers, order, domain, tampering, malleability, amounts).

use alloy::primitives::{Address, Bytes, U256};
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors};
use kalima_bridge_ethereum::contracts::{recover_signer, release_digest, sign_release, sort_signatures};

use super::{CHAIN_ID, Fixture, ReleaseArgs, THRESHOLD, klx, per_tx_cap, revert_of};

#[tokio::test]
async fn release_digest_matches_the_contract() {
    let f = Fixture::new().await;
    let args = f.args(klx(5), 1).await;
    let on_chain = f
        .bridge
        .releaseDigest(args.recipient, args.amount, args.withdrawal_id, args.expiry)
        .call()
        .await
        .expect("releaseDigest");
    assert_eq!(on_chain, f.digest(&args));
}

#[tokio::test]
async fn release_with_two_of_three_pays_once() {
    let f = Fixture::new().await;
    let args = f.args(klx(400), 1).await;
    let user_before = f.balance(f.user.address()).await;

    let receipt = f.release(&args, f.sign(&args, &[0, 2])).await.expect("release");
    let event = receipt.decoded_log::<KlxBridge::Released>().expect("Released event");
    assert_eq!(event.data.withdrawalId, args.withdrawal_id);
    assert_eq!(event.data.recipient, args.recipient);
    assert_eq!(event.data.amount, args.amount);
    assert!(f.bridge.released(args.withdrawal_id).call().await.expect("released"));
    assert_eq!(f.balance(f.user.address()).await, user_before + args.amount);
    assert_eq!(f.bridge_balance().await, f.liquidity - args.amount);

    // Replayed as is, and with a different quorum: the withdrawal id is spent either way.
    for relayers in [&[0, 2][..], &[0, 1, 2][..]] {
        let err = revert_of(f.release(&args, f.sign(&args, relayers)).await);
        assert_eq!(
            err,
            KlxBridgeErrors::AlreadyReleased(KlxBridge::AlreadyReleased { withdrawalId: args.withdrawal_id })
        );
    }
    assert_eq!(f.balance(f.user.address()).await, user_before + args.amount);
    assert_eq!(f.bridge_balance().await, f.liquidity - args.amount);

    // All three relayers are more than enough.
    let second = f.args(klx(1), 2).await;
    f.release(&second, f.sign(&second, &[0, 1, 2])).await.expect("release with 3 of 3");
    assert_eq!(f.balance(f.user.address()).await, user_before + args.amount + second.amount);
}

#[tokio::test]
async fn release_rejects_bad_authorisations() {
    struct Case {
        name: &'static str,
        args: ReleaseArgs,
        signatures: Vec<Bytes>,
        expect: KlxBridgeErrors,
    }

    let f = Fixture::new().await;
    let args = f.args(klx(10), 1).await;
    let digest = f.digest(&args);
    let by = |i: usize| sign_release(&f.relayers[i], &digest).expect("sign");
    let lowest_first = f.sign(&args, &[0, 1]);
    // The contract recovers some unrelated address from a signature over another digest.
    let stranger = |signatures: &[Bytes], args: &ReleaseArgs| {
        let signer = recover_signer(&f.digest(args), &signatures[0]).expect("recover");
        KlxBridgeErrors::NotRelayer(KlxBridge::NotRelayer { signer })
    };
    let with_domain = |chain_id: u64, bridge: Address, token: Address| {
        let digest =
            release_digest(chain_id, bridge, token, args.recipient, args.amount, args.withdrawal_id, args.expiry);
        f.sign_digest(&digest, &[0, 1])
    };

    let forged = sort_signatures([
        (f.relayers[0].address(), by(0)),
        (f.outsider.address(), sign_release(&f.outsider, &digest).expect("sign")),
    ]);
    let other_chain = with_domain(CHAIN_ID + 1, *f.bridge.address(), *f.token.address());
    let other_bridge = with_domain(CHAIN_ID, *f.token.address(), *f.token.address());
    let other_token = with_domain(CHAIN_ID, *f.bridge.address(), *f.bridge.address());
    let tampered = ReleaseArgs { amount: args.amount + U256::from(1u8), ..args.clone() };
    let redirected = ReleaseArgs { recipient: f.outsider.address(), ..args.clone() };

    let mut high_s = lowest_first[0].to_vec();
    let order = U256::from_str_radix("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141", 16)
        .expect("curve order");
    let s = U256::from_be_slice(&high_s[32..64]);
    high_s[32..64].copy_from_slice(&(order - s).to_be_bytes::<32>());
    high_s[64] ^= 27 ^ 28;
    let malleated = vec![Bytes::from(high_s), lowest_first[1].clone()];

    let zero_amount = ReleaseArgs { amount: U256::ZERO, ..args.clone() };
    let zero_recipient = ReleaseArgs { recipient: Address::ZERO, ..args.clone() };
    let over_cap = ReleaseArgs { amount: per_tx_cap() + U256::from(1u8), ..args.clone() };

    let cases = vec![
        Case {
            name: "signature by a key that is not a relayer",
            args: args.clone(),
            signatures: forged,
            expect: KlxBridgeErrors::NotRelayer(KlxBridge::NotRelayer { signer: f.outsider.address() }),
        },
        Case {
            name: "the same relayer twice",
            args: args.clone(),
            signatures: vec![by(1), by(1)],
            expect: KlxBridgeErrors::SignersNotStrictlyIncreasing(KlxBridge::SignersNotStrictlyIncreasing {}),
        },
        Case {
            name: "signers in decreasing order",
            args: args.clone(),
            signatures: lowest_first.iter().rev().cloned().collect(),
            expect: KlxBridgeErrors::SignersNotStrictlyIncreasing(KlxBridge::SignersNotStrictlyIncreasing {}),
        },
        Case {
            name: "signed for another chain id",
            args: args.clone(),
            expect: stranger(&other_chain, &args),
            signatures: other_chain,
        },
        Case {
            name: "signed for another bridge address",
            args: args.clone(),
            expect: stranger(&other_bridge, &args),
            signatures: other_bridge,
        },
        Case {
            name: "signed for another token",
            args: args.clone(),
            expect: stranger(&other_token, &args),
            signatures: other_token,
        },
        Case {
            name: "amount changed after signing",
            args: tampered.clone(),
            expect: stranger(&lowest_first, &tampered),
            signatures: lowest_first.clone(),
        },
        Case {
            name: "recipient changed after signing",
            args: redirected.clone(),
            expect: stranger(&lowest_first, &redirected),
            signatures: lowest_first.clone(),
        },
        Case {
            name: "fewer signatures than the threshold",
            args: args.clone(),
            signatures: vec![by(2)],
            expect: KlxBridgeErrors::NotEnoughSignatures(KlxBridge::NotEnoughSignatures {
                have: U256::from(1u8),
                need: U256::from(THRESHOLD),
            }),
        },
        Case {
            name: "no signatures",
            args: args.clone(),
            signatures: vec![],
            expect: KlxBridgeErrors::NotEnoughSignatures(KlxBridge::NotEnoughSignatures {
                have: U256::ZERO,
                need: U256::from(THRESHOLD),
            }),
        },
        Case {
            name: "malleated (high-s) signature",
            args: args.clone(),
            signatures: malleated,
            expect: KlxBridgeErrors::InvalidSignature(KlxBridge::InvalidSignature {}),
        },
        Case {
            name: "truncated signature",
            args: args.clone(),
            signatures: vec![lowest_first[0].slice(..64), lowest_first[1].clone()],
            expect: KlxBridgeErrors::InvalidSignature(KlxBridge::InvalidSignature {}),
        },
        Case {
            name: "zero amount",
            signatures: f.sign(&zero_amount, &[0, 1]),
            args: zero_amount,
            expect: KlxBridgeErrors::ZeroAmount(KlxBridge::ZeroAmount {}),
        },
        Case {
            name: "zero recipient",
            signatures: f.sign(&zero_recipient, &[0, 1]),
            args: zero_recipient,
            expect: KlxBridgeErrors::ZeroRecipient(KlxBridge::ZeroRecipient {}),
        },
        Case {
            name: "above the per-transaction cap",
            signatures: f.sign(&over_cap, &[0, 1, 2]),
            args: over_cap,
            expect: KlxBridgeErrors::PerTxCapExceeded(KlxBridge::PerTxCapExceeded {
                amount: per_tx_cap() + U256::from(1u8),
                cap: per_tx_cap(),
            }),
        },
    ];

    let user_before = f.balance(f.user.address()).await;
    let outsider_before = f.balance(f.outsider.address()).await;
    for case in cases {
        let err = revert_of(f.release(&case.args, case.signatures).await);
        assert_eq!(err, case.expect, "{}", case.name);
        assert!(!f.bridge.released(case.args.withdrawal_id).call().await.expect("released"), "{}", case.name);
        assert_eq!(f.balance(f.user.address()).await, user_before, "{}", case.name);
        assert_eq!(f.balance(f.outsider.address()).await, outsider_before, "{}", case.name);
        assert_eq!(f.bridge_balance().await, f.liquidity, "{}", case.name);
    }

    // The untouched release still goes through: the rejections consumed nothing.
    f.release(&args, lowest_first).await.expect("valid release after rejections");
    assert_eq!(f.balance(f.user.address()).await, user_before + args.amount);
}

#[tokio::test]
async fn release_rejects_an_expired_authorisation() {
    let f = Fixture::new().await;
    let args = ReleaseArgs { expiry: f.expiry_in(60).await, ..f.args(klx(10), 1).await };
    let signatures = f.sign(&args, &[0, 1]);
    f.chain.increase_time(120).await.expect("increase time");

    let user_before = f.balance(f.user.address()).await;
    match revert_of(f.release(&args, signatures).await) {
        KlxBridgeErrors::ReleaseExpired(KlxBridge::ReleaseExpired { expiry, now }) => {
            assert_eq!(expiry, args.expiry);
            assert!(now > expiry, "now {now} should be past expiry {expiry}");
        }
        other => panic!("expected ReleaseExpired, got {other:?}"),
    }
    assert_eq!(f.balance(f.user.address()).await, user_before);
    assert_eq!(f.bridge_balance().await, f.liquidity);
}
