//! The `TestChain` anvil harness itself: mining, reorgs, time travel, snapshots and storage
//! writes.

use alloy::primitives::{B256, U256};

use super::{CHAIN_ID, Fixture, klx, mainchain_recipient};

#[tokio::test]
async fn test_chain_mines_reorgs_and_travels_in_time() {
    use alloy::providers::Provider;

    let f = Fixture::new().await;
    let provider = f.chain.provider();
    assert_eq!(provider.get_chain_id().await.expect("chain id"), CHAIN_ID);

    let start = provider.get_block_number().await.expect("block number");
    f.chain.mine(5).await.expect("mine");
    assert_eq!(provider.get_block_number().await.expect("block number"), start + 5);

    // A deposit in the last block disappears with a reorg of depth 1; the height stays.
    let receipt = f.deposit_as(&f.user, klx(7), mainchain_recipient(0xbb)).await.expect("deposit");
    let height = provider.get_block_number().await.expect("block number");
    f.chain.reorg(1).await.expect("reorg");
    assert_eq!(provider.get_block_number().await.expect("block number"), height);
    assert!(
        provider.get_transaction_receipt(receipt.transaction_hash).await.expect("receipt lookup").is_none(),
        "the reorged deposit should be gone"
    );
    assert_eq!(f.bridge.depositNonce().call().await.expect("depositNonce"), 0);
    assert_eq!(f.bridge_balance().await, f.liquidity);

    let before = f.chain.latest_timestamp().await.expect("timestamp");
    f.chain.increase_time(1_000).await.expect("increase time");
    assert!(f.chain.latest_timestamp().await.expect("timestamp") >= before + 1_000);

    let snapshot = f.chain.snapshot().await.expect("snapshot");
    f.deposit_as(&f.user, klx(7), mainchain_recipient(0xbb)).await.expect("deposit");
    assert!(f.chain.revert(snapshot).await.expect("revert"));
    assert_eq!(f.bridge.depositNonce().call().await.expect("depositNonce"), 0);

    // `threshold` is slot 4 of KlxBridge's storage layout (after EIP712's two fallback strings,
    // Pausable/Ownable packed in slot 2 and Ownable2Step's pending owner).
    f.chain
        .set_storage_at(*f.bridge.address(), U256::from(4u8), B256::from(U256::from(3u8)))
        .await
        .expect("set storage");
    assert_eq!(f.bridge.threshold().call().await.expect("threshold"), U256::from(3u8));
}
