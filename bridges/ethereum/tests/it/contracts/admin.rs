//! Owner-only administration: relayer-set and threshold validation in the constructor and
//! `setRelayers`, replacing the set, and setting limits and the guardian.

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use kalima_bridge_ethereum::anvil::BridgeConfig;
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors};
use kalima_bridge_ethereum::contracts::{sign_release, sort_signatures};

use super::{Fixture, THRESHOLD, WINDOW_SECONDS, klx, per_tx_cap, revert_of, send, window_cap};

#[tokio::test]
async fn bad_relayer_sets_are_rejected_in_constructor_and_set_relayers() {
    let f = Fixture::new().await;
    let [a, b, c] = [0, 1, 2].map(|i| f.relayers[i].address());
    let cases: Vec<(&str, Vec<Address>, u64, KlxBridgeErrors)> = vec![
        (
            "threshold 0",
            vec![a, b, c],
            0,
            KlxBridgeErrors::BadThreshold(KlxBridge::BadThreshold { threshold: U256::ZERO, relayers: U256::from(3u8) }),
        ),
        (
            "threshold above the set size",
            vec![a, b, c],
            4,
            KlxBridgeErrors::BadThreshold(KlxBridge::BadThreshold {
                threshold: U256::from(4u8),
                relayers: U256::from(3u8),
            }),
        ),
        (
            "empty set",
            vec![],
            1,
            KlxBridgeErrors::BadThreshold(KlxBridge::BadThreshold { threshold: U256::from(1u8), relayers: U256::ZERO }),
        ),
        (
            "duplicate relayer",
            vec![a, b, a],
            2,
            KlxBridgeErrors::DuplicateRelayer(KlxBridge::DuplicateRelayer { relayer: a }),
        ),
        ("zero relayer", vec![a, Address::ZERO], 1, KlxBridgeErrors::ZeroAddress(KlxBridge::ZeroAddress {})),
    ];

    let relayers_before = f.bridge.relayers().call().await.expect("relayers");
    for (name, relayers, threshold, expect) in cases {
        let config = BridgeConfig {
            token: *f.token.address(),
            relayers: relayers.clone(),
            threshold,
            guardian: f.guardian.address(),
            per_tx_cap: per_tx_cap(),
            window_cap: window_cap(),
            window_seconds: WINDOW_SECONDS,
        };
        assert_eq!(revert_of(f.chain.deploy_bridge(&config).await), expect, "constructor: {name}");
        let err = revert_of(send(f.bridge.setRelayers(relayers, U256::from(threshold))).await);
        assert_eq!(err, expect, "setRelayers: {name}");
        assert_eq!(f.bridge.relayers().call().await.expect("relayers"), relayers_before, "{name}");
        assert_eq!(f.bridge.threshold().call().await.expect("threshold"), U256::from(THRESHOLD), "{name}");
    }

    let err = revert_of(send(f.bridge_as(&f.outsider).setRelayers(vec![a], U256::from(1u8))).await);
    assert_eq!(
        err,
        KlxBridgeErrors::OwnableUnauthorizedAccount(KlxBridge::OwnableUnauthorizedAccount {
            account: f.outsider.address()
        })
    );
}

#[tokio::test]
async fn set_relayers_replaces_the_whole_set() {
    let f = Fixture::new().await;
    let new_set = vec![f.relayers[0].address(), f.outsider.address()];
    let receipt = send(f.bridge.setRelayers(new_set.clone(), U256::from(2u8))).await.expect("setRelayers");
    let event = receipt.decoded_log::<KlxBridge::RelayersChanged>().expect("RelayersChanged event");
    assert_eq!(event.data.relayers, new_set);
    assert_eq!(f.bridge.relayers().call().await.expect("relayers"), new_set);

    // A quorum of the old set no longer counts once any of them was dropped.
    let args = f.args(klx(10), 1).await;
    let err = revert_of(f.release(&args, f.sign(&args, &[0, 1])).await);
    let dropped = [f.relayers[1].address()];
    assert!(
        matches!(&err, KlxBridgeErrors::NotRelayer(e) if dropped.contains(&e.signer)),
        "expected NotRelayer for a dropped relayer, got {err:?}"
    );

    let digest = f.digest(&args);
    let signatures = sort_signatures([
        (f.relayers[0].address(), sign_release(&f.relayers[0], &digest).expect("sign")),
        (f.outsider.address(), sign_release(&f.outsider, &digest).expect("sign")),
    ]);
    let user_before = f.balance(f.user.address()).await;
    f.release(&args, signatures).await.expect("release by the new set");
    assert_eq!(f.balance(f.user.address()).await, user_before + args.amount);
}

#[tokio::test]
async fn limits_and_guardian_are_owner_only_and_validated() {
    let f = Fixture::new().await;
    let not_owner = KlxBridgeErrors::OwnableUnauthorizedAccount(KlxBridge::OwnableUnauthorizedAccount {
        account: f.guardian.address(),
    });
    let as_guardian = f.bridge_as(&f.guardian);
    assert_eq!(revert_of(send(as_guardian.setLimits(klx(1), klx(2), U256::from(60u8))).await), not_owner);
    assert_eq!(revert_of(send(as_guardian.setGuardian(f.guardian.address())).await), not_owner);

    for (per_tx, window, secs) in [(klx(1), klx(2), 0u64), (klx(3), klx(2), 60)] {
        let err = revert_of(send(f.bridge.setLimits(per_tx, window, U256::from(secs))).await);
        assert_eq!(
            err,
            KlxBridgeErrors::BadLimits(KlxBridge::BadLimits {
                perTxCap: per_tx,
                windowCap: window,
                windowSeconds: U256::from(secs),
            })
        );
    }
    send(f.bridge.setLimits(klx(5), klx(5), U256::from(60u8))).await.expect("setLimits");
    let args = f.args(klx(6), 1).await;
    let err = revert_of(f.release(&args, f.sign(&args, &[0, 1])).await);
    assert_eq!(err, KlxBridgeErrors::PerTxCapExceeded(KlxBridge::PerTxCapExceeded { amount: klx(6), cap: klx(5) }));

    let err = revert_of(send(f.bridge.setGuardian(Address::ZERO)).await);
    assert_eq!(err, KlxBridgeErrors::ZeroAddress(KlxBridge::ZeroAddress {}));
    send(f.bridge.setGuardian(f.outsider.address())).await.expect("setGuardian");
    let err = revert_of(send(f.bridge_as(&f.guardian).pause()).await);
    assert_eq!(err, KlxBridgeErrors::NotGuardian(KlxBridge::NotGuardian { caller: f.guardian.address() }));
    send(f.bridge_as(&f.outsider).pause()).await.expect("new guardian pauses");

    let bad_guardian = BridgeConfig {
        token: *f.token.address(),
        relayers: f.relayers.iter().map(PrivateKeySigner::address).collect(),
        threshold: THRESHOLD,
        guardian: Address::ZERO,
        per_tx_cap: per_tx_cap(),
        window_cap: window_cap(),
        window_seconds: WINDOW_SECONDS,
    };
    let err = revert_of(f.chain.deploy_bridge(&bad_guardian).await);
    assert_eq!(err, KlxBridgeErrors::ZeroAddress(KlxBridge::ZeroAddress {}));
    let bad_token = BridgeConfig { token: Address::ZERO, guardian: f.guardian.address(), ..bad_guardian.clone() };
    let err = revert_of(f.chain.deploy_bridge(&bad_token).await);
    assert_eq!(err, KlxBridgeErrors::ZeroAddress(KlxBridge::ZeroAddress {}));
    let bad_limits = BridgeConfig { guardian: f.guardian.address(), window_seconds: 0, ..bad_guardian };
    let err = revert_of(f.chain.deploy_bridge(&bad_limits).await);
    assert_eq!(
        err,
        KlxBridgeErrors::BadLimits(KlxBridge::BadLimits {
            perTxCap: per_tx_cap(),
            windowCap: window_cap(),
            windowSeconds: U256::ZERO,
        })
    );
}
