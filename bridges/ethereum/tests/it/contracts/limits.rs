//! The bridge's brakes: the guardian's pause and the rolling-window release cap.

use alloy::primitives::{B256, U256};
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors};

use super::{Fixture, ReleaseArgs, WINDOW_SECONDS, klx, mainchain_recipient, per_tx_cap, revert_of, send, window_cap};

#[tokio::test]
async fn only_the_guardian_pauses_and_pause_stops_both_directions() {
    let f = Fixture::new().await;
    for who in [&f.admin, &f.outsider, &f.relayers[0]] {
        let err = revert_of(send(f.bridge_as(who).pause()).await);
        assert_eq!(err, KlxBridgeErrors::NotGuardian(KlxBridge::NotGuardian { caller: who.address() }));
    }
    send(f.bridge_as(&f.guardian).pause()).await.expect("guardian pauses");
    assert!(f.bridge.paused().call().await.expect("paused"));

    let user_before = f.balance(f.user.address()).await;
    let err = revert_of(f.deposit_as(&f.user, klx(1), mainchain_recipient(0xaa)).await);
    assert_eq!(err, KlxBridgeErrors::EnforcedPause(KlxBridge::EnforcedPause {}));
    let args = f.args(klx(10), 1).await;
    let err = revert_of(f.release(&args, f.sign(&args, &[0, 1])).await);
    assert_eq!(err, KlxBridgeErrors::EnforcedPause(KlxBridge::EnforcedPause {}));
    assert_eq!(f.balance(f.user.address()).await, user_before);
    assert_eq!(f.bridge_balance().await, f.liquidity);

    for who in [&f.admin, &f.outsider] {
        let err = revert_of(send(f.bridge_as(who).unpause()).await);
        assert_eq!(err, KlxBridgeErrors::NotGuardian(KlxBridge::NotGuardian { caller: who.address() }));
    }
    send(f.bridge_as(&f.guardian).unpause()).await.expect("guardian unpauses");
    let err = revert_of(send(f.bridge_as(&f.guardian).unpause()).await);
    assert_eq!(err, KlxBridgeErrors::ExpectedPause(KlxBridge::ExpectedPause {}));

    f.deposit_as(&f.user, klx(1), mainchain_recipient(0xaa)).await.expect("deposit after unpause");
    f.release(&args, f.sign(&args, &[0, 1])).await.expect("release after unpause");
    assert_eq!(f.balance(f.user.address()).await, user_before - klx(1) + args.amount);
    assert_eq!(f.bridge_balance().await, f.liquidity + klx(1) - args.amount);
}

#[tokio::test]
async fn window_cap_holds_and_frees_up_after_the_window() {
    let f = Fixture::new().await;
    let user_before = f.balance(f.user.address()).await;
    for id in [1, 2] {
        let args = f.args(per_tx_cap(), id).await;
        f.release(&args, f.sign(&args, &[0, 1])).await.expect("release within the window cap");
    }
    assert_eq!(f.bridge.windowReleased().call().await.expect("windowReleased"), klx(2_000));

    let third = f.args(klx(600), 3).await;
    let err = revert_of(f.release(&third, f.sign(&third, &[0, 1])).await);
    assert_eq!(
        err,
        KlxBridgeErrors::WindowCapExceeded(KlxBridge::WindowCapExceeded { wouldBe: klx(2_600), cap: window_cap() })
    );
    assert_eq!(f.balance(f.user.address()).await, user_before + klx(2_000));

    f.chain.increase_time(WINDOW_SECONDS).await.expect("increase time");
    assert_eq!(f.bridge.windowReleased().call().await.expect("windowReleased"), U256::ZERO);
    let third = ReleaseArgs { expiry: f.expiry_in(3_600).await, ..third };
    f.release(&third, f.sign(&third, &[0, 1])).await.expect("release after the window passed");
    assert_eq!(f.bridge.windowReleased().call().await.expect("windowReleased"), klx(600));
    assert_eq!(f.balance(f.user.address()).await, user_before + klx(2_600));
    assert_eq!(f.bridge_balance().await, f.liquidity - klx(2_600));
}

#[tokio::test]
async fn window_is_an_exact_rolling_sum() {
    let f = Fixture::new().await;
    let release_at = |timestamp: u64, amount: U256, id: u8| {
        let f = &f;
        async move {
            f.chain.set_next_block_timestamp(timestamp).await.expect("set next timestamp");
            let args = ReleaseArgs {
                recipient: f.user.address(),
                amount,
                withdrawal_id: B256::repeat_byte(id),
                expiry: U256::from(timestamp + 3_600),
            };
            f.release(&args, f.sign(&args, &[1, 2])).await
        }
    };

    let start = f.chain.latest_timestamp().await.expect("timestamp") + 10;
    release_at(start, klx(1_000), 1).await.expect("first release");
    release_at(start + WINDOW_SECONDS / 2, klx(1_000), 2).await.expect("second release");

    // One second before the first release leaves the window, it still counts...
    let err = revert_of(release_at(start + WINDOW_SECONDS - 1, klx(600), 3).await);
    assert_eq!(
        err,
        KlxBridgeErrors::WindowCapExceeded(KlxBridge::WindowCapExceeded { wouldBe: klx(2_600), cap: window_cap() })
    );
    // ...and at exactly windowSeconds it no longer does, while the second one still does.
    release_at(start + WINDOW_SECONDS, klx(1_000), 3).await.expect("release as the first leaves the window");
    assert_eq!(f.bridge.windowReleased().call().await.expect("windowReleased"), klx(2_000));
    let err = revert_of(release_at(start + WINDOW_SECONDS + 1, klx(501), 4).await);
    assert_eq!(
        err,
        KlxBridgeErrors::WindowCapExceeded(KlxBridge::WindowCapExceeded { wouldBe: klx(2_501), cap: window_cap() })
    );
    assert_eq!(f.bridge_balance().await, f.liquidity - klx(3_000));
}
