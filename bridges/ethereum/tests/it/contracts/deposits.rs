//! Deposits into `KlxBridge`: tokens locked, deposits numbered, bad deposits and
//! fee-on-transfer tokens refused.

use alloy::primitives::{B256, U256};
use alloy::signers::local::PrivateKeySigner;
use kalima_bridge_ethereum::anvil::BridgeConfig;
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors};

use super::{Fixture, THRESHOLD, WINDOW_SECONDS, klx, mainchain_recipient, per_tx_cap, revert_of, send, window_cap};

alloy::sol!(
    #[sol(rpc)]
    FeeOnTransferToken,
    "contracts/out/test/FeeOnTransferToken.json"
);

#[tokio::test]
async fn deposit_refuses_a_fee_on_transfer_token() {
    let f = Fixture::new().await;
    let fee_token = FeeOnTransferToken::deploy(f.chain.provider()).await.expect("deploy FeeOnTransferToken");
    let bridge = f
        .chain
        .deploy_bridge(&BridgeConfig {
            token: *fee_token.address(),
            relayers: f.relayers.iter().map(PrivateKeySigner::address).collect(),
            threshold: THRESHOLD,
            guardian: f.guardian.address(),
            per_tx_cap: per_tx_cap(),
            window_cap: window_cap(),
            window_seconds: WINDOW_SECONDS,
        })
        .await
        .expect("deploy KlxBridge over the fee token");
    let admin_before = fee_token.balanceOf(f.admin.address()).call().await.expect("balanceOf");

    send(fee_token.approve(*bridge.address(), klx(100))).await.expect("approve");
    let err = revert_of(send(bridge.deposit(klx(100), mainchain_recipient(0xaa))).await);
    assert_eq!(
        err,
        KlxBridgeErrors::DepositAmountMismatch(KlxBridge::DepositAmountMismatch {
            expected: klx(100),
            received: klx(99),
        })
    );
    assert_eq!(fee_token.balanceOf(f.admin.address()).call().await.expect("balanceOf"), admin_before);
    assert_eq!(fee_token.balanceOf(*bridge.address()).call().await.expect("balanceOf"), U256::ZERO);
    assert_eq!(bridge.depositNonce().call().await.expect("depositNonce"), 0);
}

#[tokio::test]
async fn deposit_locks_tokens_and_numbers_deposits_from_zero() {
    let f = Fixture::new().await;
    let user_before = f.balance(f.user.address()).await;
    let amounts = [klx(1), klx(20), klx(300)];
    for (nonce, amount) in amounts.iter().enumerate() {
        let receipt = f.deposit_as(&f.user, *amount, mainchain_recipient(0xaa)).await.expect("deposit");
        let event = receipt.decoded_log::<KlxBridge::Deposit>().expect("Deposit event");
        assert_eq!(event.data.nonce, nonce as u64);
        assert_eq!(event.data.from, f.user.address());
        assert_eq!(event.data.mainchainRecipient, mainchain_recipient(0xaa));
        assert_eq!(event.data.amount, *amount);
        assert_eq!(event.data.token, *f.token.address());
        assert_eq!(event.address, *f.bridge.address());
    }
    let total: U256 = amounts.iter().copied().sum();
    assert_eq!(f.bridge.depositNonce().call().await.expect("depositNonce"), 3);
    assert_eq!(f.balance(f.user.address()).await, user_before - total);
    assert_eq!(f.bridge_balance().await, f.liquidity + total);
}

#[tokio::test]
async fn deposit_rejects_zero_amount_and_zero_recipient() {
    let f = Fixture::new().await;
    let user_before = f.balance(f.user.address()).await;

    let err = revert_of(f.deposit_as(&f.user, U256::ZERO, mainchain_recipient(0xaa)).await);
    assert_eq!(err, KlxBridgeErrors::ZeroAmount(KlxBridge::ZeroAmount {}));
    let err = revert_of(f.deposit_as(&f.user, klx(1), B256::ZERO).await);
    assert_eq!(err, KlxBridgeErrors::ZeroRecipient(KlxBridge::ZeroRecipient {}));

    assert_eq!(f.balance(f.user.address()).await, user_before);
    assert_eq!(f.bridge_balance().await, f.liquidity);
    assert_eq!(f.bridge.depositNonce().call().await.expect("depositNonce"), 0);
}
