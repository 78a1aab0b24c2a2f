//! The `KlxToken` and `KlxBridge` contracts on a real anvil: artifacts in sync with the
//! sources, deposits, threshold-signed releases and every rejection path, pause, rate limits
//! and relayer-set administration. Every test that moves money checks balances on chain.
//!
//! This file holds the shared fixture and helpers; the tests live in the submodules.

use std::time::Duration;

use alloy::contract::{Error as ContractCallError, SolCallBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::DynProvider;
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use kalima_bridge_ethereum::anvil::{BridgeConfig, TestChain};
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors, KlxBridgeInstance};
use kalima_bridge_ethereum::contracts::KlxToken::KlxTokenInstance;
use kalima_bridge_ethereum::contracts::{release_digest, sign_release, sort_signatures};

mod admin;
mod artifacts;
mod deposits;
mod limits;
mod releases;
mod test_chain;
mod token;

const CHAIN_ID: u64 = 31_337;
const WINDOW_SECONDS: u64 = 3_600;
const THRESHOLD: u64 = 2;
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

fn klx(whole: u64) -> U256 {
    U256::from(whole) * U256::from(10u64).pow(U256::from(18u64))
}

fn per_tx_cap() -> U256 {
    klx(1_000)
}

fn window_cap() -> U256 {
    klx(2_500)
}

fn mainchain_recipient(byte: u8) -> B256 {
    B256::repeat_byte(byte)
}

/// What a release call carries besides its signatures.
#[derive(Debug, Clone)]
struct ReleaseArgs {
    recipient: Address,
    amount: U256,
    withdrawal_id: B256,
    expiry: U256,
}

/// A chain with the token and the bridge deployed: account 0 is the admin, 1 the guardian,
/// 2..=4 the relayers (threshold 2), 5 a user holding KLX, 6 an outsider.
struct Fixture {
    chain: TestChain,
    token: KlxTokenInstance<DynProvider>,
    bridge: KlxBridgeInstance<DynProvider>,
    admin: PrivateKeySigner,
    guardian: PrivateKeySigner,
    relayers: Vec<PrivateKeySigner>,
    user: PrivateKeySigner,
    outsider: PrivateKeySigner,
    /// The bridge's initial holdings, standing in for earlier deposits that releases pay from.
    liquidity: U256,
}

impl Fixture {
    async fn new() -> Self {
        let chain = TestChain::spawn(CHAIN_ID);
        let admin = chain.signer(0);
        let guardian = chain.signer(1);
        let relayers: Vec<_> = (2..=4).map(|i| chain.signer(i)).collect();
        let user = chain.signer(5);
        let outsider = chain.signer(6);

        let token = chain.deploy_token().await.expect("deploy KlxToken");
        let bridge = chain
            .deploy_bridge(&BridgeConfig {
                token: *token.address(),
                relayers: relayers.iter().map(PrivateKeySigner::address).collect(),
                threshold: THRESHOLD,
                guardian: guardian.address(),
                per_tx_cap: per_tx_cap(),
                window_cap: window_cap(),
                window_seconds: WINDOW_SECONDS,
            })
            .await
            .expect("deploy KlxBridge");

        let liquidity = klx(100_000);
        send(token.mint(user.address(), klx(10_000))).await.expect("mint to user");
        send(token.mint(*bridge.address(), liquidity)).await.expect("mint to bridge");

        Self { chain, token, bridge, admin, guardian, relayers, user, outsider, liquidity }
    }

    /// The bridge as seen by a transaction signed with `signer`.
    fn bridge_as(&self, signer: &PrivateKeySigner) -> KlxBridgeInstance<DynProvider> {
        KlxBridge::new(*self.bridge.address(), self.chain.provider_for(signer))
    }

    fn token_as(&self, signer: &PrivateKeySigner) -> KlxTokenInstance<DynProvider> {
        KlxTokenInstance::new(*self.token.address(), self.chain.provider_for(signer))
    }

    async fn balance(&self, who: Address) -> U256 {
        self.token.balanceOf(who).call().await.expect("balanceOf")
    }

    async fn bridge_balance(&self) -> U256 {
        self.balance(*self.bridge.address()).await
    }

    fn digest(&self, args: &ReleaseArgs) -> B256 {
        release_digest(
            CHAIN_ID,
            *self.bridge.address(),
            *self.token.address(),
            args.recipient,
            args.amount,
            args.withdrawal_id,
            args.expiry,
        )
    }

    /// Signatures by the given relayers over `digest`, in the order the contract wants.
    fn sign_digest(&self, digest: &B256, relayers: &[usize]) -> Vec<Bytes> {
        sort_signatures(relayers.iter().map(|&i| {
            let relayer = &self.relayers[i];
            (relayer.address(), sign_release(relayer, digest).expect("sign release"))
        }))
    }

    fn sign(&self, args: &ReleaseArgs, relayers: &[usize]) -> Vec<Bytes> {
        self.sign_digest(&self.digest(args), relayers)
    }

    async fn release(
        &self,
        args: &ReleaseArgs,
        signatures: Vec<Bytes>,
    ) -> Result<TransactionReceipt, ContractCallError> {
        // Anyone may submit; the signatures are the authority, so submit as an outsider.
        let bridge = self.bridge_as(&self.outsider);
        send(bridge.release(args.recipient, args.amount, args.withdrawal_id, args.expiry, signatures)).await
    }

    async fn deposit_as(
        &self,
        who: &PrivateKeySigner,
        amount: U256,
        recipient: B256,
    ) -> Result<TransactionReceipt, ContractCallError> {
        send(self.token_as(who).approve(*self.bridge.address(), amount)).await.expect("approve");
        send(self.bridge_as(who).deposit(amount, recipient)).await
    }

    async fn expiry_in(&self, secs: u64) -> U256 {
        U256::from(self.chain.latest_timestamp().await.expect("latest timestamp") + secs)
    }

    async fn args(&self, amount: U256, id: u8) -> ReleaseArgs {
        ReleaseArgs {
            recipient: self.user.address(),
            amount,
            withdrawal_id: B256::repeat_byte(id),
            expiry: self.expiry_in(3_600).await,
        }
    }
}

/// Sends a call and waits for its receipt; a revert surfaces as the error of gas estimation.
async fn send<C: SolCall>(call: SolCallBuilder<&DynProvider, C>) -> Result<TransactionReceipt, ContractCallError> {
    let pending = call.send().await?;
    // anvil mines on submission, so a receipt that takes long means the transaction is stuck
    // (a nonce gap, say); fail instead of hanging the test run.
    let receipt = tokio::time::timeout(RECEIPT_TIMEOUT, pending.get_receipt())
        .await
        .expect("no receipt within the timeout; is the transaction stuck behind a nonce gap?")
        .expect("receipt of a sent transaction");
    assert!(receipt.status(), "transaction mined but failed: {receipt:?}");
    Ok(receipt)
}

/// The `KlxBridge` custom error a failed call reverted with.
fn revert_of<T: std::fmt::Debug>(result: Result<T, ContractCallError>) -> KlxBridgeErrors {
    let err = result.expect_err("the call should revert");
    err.as_decoded_interface_error::<KlxBridgeErrors>()
        .unwrap_or_else(|| panic!("reverted without a KlxBridge error: {err:#}"))
}
