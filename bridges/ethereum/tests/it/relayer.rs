//! Relayers against a real anvil node and a real chain: deposits minted once by a quorum,
//! withdrawals released, reorgs, a relayer killed and restarted, two chains, and the
//! conservation check. Each scenario asserts balances on both sides.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::providers::DynProvider;
use alloy::sol_types::SolValue;
use ed25519_dalek::SigningKey;
use kalima_bridge_ethereum::anvil::{BridgeConfig, TestChain as Anvil};
use kalima_bridge_ethereum::contracts::KlxBridge::KlxBridgeInstance;
use kalima_bridge_ethereum::contracts::KlxToken::KlxTokenInstance;
use kalima_bridge_ethereum::{BridgeSection, ChainSettings, Identity, Relayer};
use kalima_core::ledger::{
    AccountKey, BridgeChain, DepositStatus, KLX, Ledger, LedgerOp, SignedWithdrawal, WithdrawalStatus,
};
use kalima_core::registry::ADMIN_ID;
use kalima_core::testing::{TestChain, wait_for};

const CHAIN: &str = "bridge-test";
const PATIENCE: Duration = Duration::from_secs(60);

/// One bridged EVM chain with its contracts and a depositor.
struct Evm {
    name: String,
    anvil: Anvil,
    token: KlxTokenInstance<DynProvider>,
    bridge: KlxBridgeInstance<DynProvider>,
    user: Address,
}

impl Evm {
    async fn start(name: &str, chain_id: u64, relayers: &[Address]) -> Evm {
        let anvil = Anvil::spawn(chain_id);
        let token = anvil.deploy_token().await.expect("deploy token");
        let bridge = anvil
            .deploy_bridge(&BridgeConfig {
                token: *token.address(),
                relayers: relayers.to_vec(),
                threshold: 2,
                guardian: anvil.signer(9).address(),
                per_tx_cap: U256::from(1_000u128 * KLX),
                window_cap: U256::from(10_000u128 * KLX),
                window_seconds: 3600,
            })
            .await
            .expect("deploy bridge");
        let user_signer = anvil.signer(5);
        let user = user_signer.address();
        token.mint(user, U256::from(1_000u128 * KLX)).send().await.expect("mint").get_receipt().await.expect("mined");
        Evm { name: name.into(), anvil, token, bridge, user }
    }

    fn settings(&self) -> ChainSettings {
        ChainSettings {
            name: self.name.clone(),
            chain_id: self.anvil.chain_id(),
            rpc_url: self.anvil.endpoint().to_string(),
            bridge: format!("{:#x}", self.bridge.address()),
            token: format!("{:#x}", self.token.address()),
            confirmations: 0,
            poll_interval_ms: 100,
            start_block: 0,
            rescan_blocks: 64,
            max_block_range: 500,
            submit_releases: true,
            submit_delay_ms: 1_000,
        }
    }

    /// The user deposits `amount` for native account `to`; returns the transaction hash.
    async fn deposit(&self, amount: u128, to: &SigningKey) -> B256 {
        // A fresh provider each time: one that cached the account nonce would stay ahead of
        // the chain after a reorg dropped transactions, and its next one would never mine.
        let provider = self.anvil.provider_for(&self.anvil.signer(5));
        let token = KlxTokenInstance::new(*self.token.address(), provider.clone());
        let bridge = KlxBridgeInstance::new(*self.bridge.address(), provider);
        let approve = token.approve(*bridge.address(), U256::from(amount)).send().await.expect("approve");
        tokio::time::timeout(Duration::from_secs(30), approve.get_receipt())
            .await
            .expect("approve not mined in 30 s")
            .expect("approve mined");
        let pending =
            bridge.deposit(U256::from(amount), B256::from(AccountKey::of(to).0)).send().await.expect("deposit");
        let receipt = tokio::time::timeout(Duration::from_secs(30), pending.get_receipt())
            .await
            .expect("deposit not mined in 30 s")
            .expect("deposit mined");
        assert!(receipt.status(), "deposit reverted");
        receipt.transaction_hash
    }

    async fn balance(&self, who: Address) -> u128 {
        let b = self.token.balanceOf(who).call().await.expect("balanceOf");
        u128::try_from(b).expect("balance fits u128")
    }

    async fn locked(&self) -> u128 {
        self.balance(*self.bridge.address()).await
    }

    /// Mines enough blocks for everything so far to be final (anvil: finalized = latest - 64).
    async fn finalize(&self) {
        self.anvil.mine(70).await.expect("mine");
    }
}

/// A chain, three relayer identities (2-of-3), and the bridged chains.
struct Setup {
    t: TestChain,
    identities: Vec<Arc<Identity>>,
    evms: Vec<Evm>,
}

impl Setup {
    async fn start(chains: &[(&str, u64)]) -> Setup {
        let t = TestChain::start(CHAIN).await;
        t.register("wallet", &[]).await;
        // Relayers pay gas with anvil's funded dev accounts 1..=3.
        let probe = Anvil::spawn(1);
        let eth: Vec<_> = (1..=3).map(|i| probe.signer(i)).collect();
        drop(probe);
        let mut identities = Vec::new();
        for (i, eth) in eth.into_iter().enumerate() {
            let device = format!("relayer-{i}");
            let device_key = t.register_signing(&device).await;
            identities.push(Arc::new(Identity { device, device_key, eth }));
        }
        let addresses: Vec<Address> = identities.iter().map(|i| i.eth.address()).collect();
        let mut evms = Vec::new();
        for (name, id) in chains {
            let evm = Evm::start(name, *id, &addresses).await;
            let config = BridgeChain {
                chain_id: *id,
                bridge: format!("{:#x}", evm.bridge.address()),
                token: format!("{:#x}", evm.token.address()),
                relayers: identities
                    .iter()
                    .map(|i| kalima_core::ledger::Relayer {
                        device: i.device.clone(),
                        eth_address: format!("{:#x}", i.eth.address()),
                    })
                    .collect(),
                threshold: 2,
                release_ttl_secs: 3600,
                max_withdrawal: 1_000 * KLX,
            };
            t.ledger(LedgerOp::ConfigureBridge { name: name.to_string(), config }.instruction(ADMIN_ID, String::new()))
                .await
                .expect("configure bridge");
            evms.push(evm);
        }
        Setup { t, identities, evms }
    }

    fn section(&self) -> BridgeSection {
        BridgeSection {
            relayer_device: None,
            reconcile_interval_ms: 200,
            chains: self.evms.iter().map(Evm::settings).collect(),
            ..BridgeSection::default()
        }
    }

    fn relayer(&self, i: usize) -> Relayer {
        Relayer::start_with(self.t.chain.clone(), &self.section(), self.identities[i].clone()).expect("start relayer")
    }

    /// A relayer that signs releases but never sends them.
    fn signing_only_relayer(&self, i: usize) -> Relayer {
        let mut section = self.section();
        for c in &mut section.chains {
            c.submit_releases = false;
        }
        Relayer::start_with(self.t.chain.clone(), &section, self.identities[i].clone()).expect("start relayer")
    }

    fn ledger(&self) -> Ledger<'_> {
        Ledger::new(self.t.chain.memcache())
    }

    fn native(&self, k: &SigningKey) -> u128 {
        self.ledger().account(&AccountKey::of(k)).balance
    }

    async fn wait_native(&self, k: &SigningKey, want: u128) {
        let ledger = || self.native(k);
        wait_for(
            PATIENCE,
            &format!("native balance {want}"),
            || (ledger() == want).then_some(()),
            || format!("balance {}, supply {:?}", ledger(), self.ledger().supply()),
        )
        .await;
    }

    /// Deposits `amount` on `evm` for `to`, makes it final, and waits for the mint.
    async fn deposit_minted(&self, evm: &Evm, amount: u128, to: &SigningKey) {
        let want = self.native(to) + amount;
        evm.deposit(amount, to).await;
        evm.finalize().await;
        self.wait_native(to, want).await;
    }

    /// The three relayers, each serving every chain.
    fn relayers(&self) -> Vec<Relayer> {
        (0..3).map(|i| self.relayer(i)).collect()
    }

    async fn withdraw(&self, from: &SigningKey, bridge: &str, to: Address, amount: u128) -> String {
        let nonce = self.ledger().account(&AccountKey::of(from)).nonce + 1;
        let w = SignedWithdrawal::sign(CHAIN, from, bridge, &format!("{to:#x}"), amount, nonce);
        self.t.ledger(LedgerOp::Withdraw(w).instruction("wallet", String::new())).await.expect("withdraw");
        let pending = self.ledger().pending_withdrawals(bridge);
        pending.last().expect("a pending withdrawal").id.clone()
    }

    /// Mines blocks on every chain until `done`, so releases and their reports get final.
    async fn mine_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            for e in &self.evms {
                e.anvil.mine(8).await.expect("mine");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_conserved(&self) {
        let l = self.ledger();
        let sum: u128 = l.accounts().iter().map(|(_, a)| a.balance).sum();
        assert_eq!(sum, l.supply().circulating(), "native balances vs supply");
    }
}

fn account() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn klx_crosses_to_the_chain_and_back_with_balances_matching_on_both_sides() {
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let relayers = s.relayers();
    let e = &s.evms[0];
    let alice = account();

    let before = e.balance(e.user).await;
    e.deposit(100 * KLX, &alice).await;
    // Not final yet: nothing is minted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.native(&alice), 0, "minted before finality");
    e.finalize().await;
    s.wait_native(&alice, 100 * KLX).await;
    assert_eq!(e.balance(e.user).await, before - 100 * KLX);
    assert_eq!(e.locked().await, 100 * KLX);
    let rec = s.ledger().deposit("ethereum", 0).expect("deposit record");
    assert_eq!(rec.status, DepositStatus::Minted);
    assert!(rec.votes.len() >= 2, "minted on a quorum: {:?}", rec.votes.keys());

    let id = s.withdraw(&alice, "ethereum", e.user, 40 * KLX).await;
    assert_eq!(s.native(&alice), 60 * KLX, "burned at once");
    s.mine_until("the release to be reported", || {
        s.ledger().withdrawal("ethereum", &id).is_some_and(|w| w.status == WithdrawalStatus::Released)
    })
    .await;
    assert_eq!(e.balance(e.user).await, before - 60 * KLX, "40 KLX released to the user");
    assert_eq!(e.locked().await, 60 * KLX);
    let state = s.ledger().bridge_state("ethereum");
    assert_eq!((state.minted, state.burned, state.released), (100 * KLX, 40 * KLX, 40 * KLX));
    assert_eq!(s.ledger().supply().circulating(), 60 * KLX);
    s.assert_conserved();
    for r in relayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_reorged_away_before_finality_is_never_minted() {
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let relayers = s.relayers();
    let e = &s.evms[0];
    let (alice, bob) = (account(), account());
    let before = e.balance(e.user).await;

    e.deposit(7 * KLX, &alice).await;
    assert_eq!(e.locked().await, 7 * KLX);
    // The relayers run several rounds while the deposit is in the chain's head: a relayer
    // acting on unfinalized blocks would attest it now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Drop the last blocks (approve and deposit) before they are final.
    e.anvil.reorg(2).await.expect("reorg");
    assert_eq!(e.locked().await, 0, "the reorg removed the deposit");
    assert_eq!(e.balance(e.user).await, before);

    // A later deposit (nonce 0 again, since the first never happened) is minted; the
    // reorged one never is.
    s.deposit_minted(e, 3 * KLX, &bob).await;
    e.finalize().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.native(&alice), 0, "the reorged deposit was minted");
    assert_eq!(s.ledger().supply().minted, 3 * KLX);
    assert_eq!(e.locked().await, 3 * KLX);
    s.assert_conserved();
    for r in relayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relayer_killed_mid_flight_and_restarted_mints_nothing_twice() {
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let e = &s.evms[0];
    let alice = account();
    // Only relayer 0 runs at first: it attests, and nothing can mint (2 of 3 needed).
    let r0 = s.relayer(0);
    for _ in 0..3 {
        e.deposit(5 * KLX, &alice).await;
    }
    e.finalize().await;
    wait_for(
        PATIENCE,
        "relayer-0 to attest deposit 0",
        || s.ledger().deposit("ethereum", 0).map(|_| ()),
        || String::from("no record"),
    )
    .await;
    r0.abort();
    assert_eq!(s.native(&alice), 0);
    // Restarted (its cursor comes back from the store), with a second relayer.
    let r0 = s.relayer(0);
    let r1 = s.relayer(1);
    s.wait_native(&alice, 15 * KLX).await;
    // Kill and restart both again; more rounds change nothing.
    r0.abort();
    r1.abort();
    let r0 = s.relayer(0);
    let r1 = s.relayer(1);
    let r2 = s.relayer(2);
    e.finalize().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(s.native(&alice), 15 * KLX, "a deposit was minted twice");
    let state = s.ledger().bridge_state("ethereum");
    assert_eq!((state.next_deposit, state.minted), (3, 15 * KLX));
    assert_eq!(e.locked().await, 15 * KLX);
    s.assert_conserved();
    for r in [r0, r1, r2] {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_chains_at_once_keep_separate_totals_and_conservation_holds_across_them() {
    let s = Setup::start(&[("ethereum", 31337), ("polygon", 31338)]).await;
    let relayers = s.relayers();
    let (eth, pol) = (&s.evms[0], &s.evms[1]);
    let alice = account();
    eth.deposit(30 * KLX, &alice).await;
    pol.deposit(20 * KLX, &alice).await;
    eth.finalize().await;
    pol.finalize().await;
    s.wait_native(&alice, 50 * KLX).await;
    let id = s.withdraw(&alice, "polygon", pol.user, 15 * KLX).await;
    s.mine_until("the polygon release", || {
        s.ledger().withdrawal("polygon", &id).is_some_and(|w| w.status == WithdrawalStatus::Released)
    })
    .await;
    assert_eq!((eth.locked().await, pol.locked().await), (30 * KLX, 5 * KLX));
    let (se, sp) = (s.ledger().bridge_state("ethereum"), s.ledger().bridge_state("polygon"));
    assert_eq!((se.minted, se.burned), (30 * KLX, 0));
    assert_eq!((sp.minted, sp.burned, sp.released), (20 * KLX, 15 * KLX, 15 * KLX));
    assert_eq!(s.native(&alice), 35 * KLX);
    let conservation = relayers[0].conservation.read().clone();
    assert!(conservation.ok, "{conservation:?}");
    s.assert_conserved();
    for r in relayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_conservation_check_halts_the_bridge_when_locked_funds_go_missing() {
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let relayers = s.relayers();
    let e = &s.evms[0];
    let alice = account();
    s.deposit_minted(e, 50 * KLX, &alice).await;

    // Tamper with the token ledger: the bridge's balance (OpenZeppelin ERC20 `_balances`, slot
    // 0) drops to 10 KLX, as if locked funds were drained.
    let slot = keccak256((*e.bridge.address(), U256::ZERO).abi_encode());
    e.anvil
        .set_storage_at(*e.token.address(), U256::from_be_bytes(slot.0), B256::from(U256::from(10 * KLX)))
        .await
        .expect("set storage");
    assert_eq!(e.locked().await, 10 * KLX);
    e.finalize().await;
    let halted = wait_for(
        PATIENCE,
        "the bridge to halt",
        || s.ledger().bridge_state("ethereum").halted,
        || format!("{:?}", relayers[0].conservation.read()),
    )
    .await;
    assert!(halted.reason.contains("locked"), "{}", halted.reason);

    // Halted: a new deposit is not minted and a withdrawal is refused.
    e.deposit(5 * KLX, &alice).await;
    e.finalize().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(s.native(&alice), 50 * KLX, "minted while halted");
    let w = SignedWithdrawal::sign(CHAIN, &alice, "ethereum", &format!("{:#x}", e.user), KLX, 1);
    let refused = s.t.ledger(LedgerOp::Withdraw(w).instruction("wallet", String::new())).await;
    assert!(refused.is_err(), "withdrawal accepted while halted");
    assert_eq!(s.native(&alice), 50 * KLX);
    for r in relayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_withdrawal_never_released_before_its_expiry_is_refunded_and_cannot_be_released_after() {
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let e = &s.evms[0];
    // A two-second release window, and relayers that sign but never send.
    let mut config = s.ledger().bridge("ethereum").expect("bridge");
    config.release_ttl_secs = 2;
    s.t.ledger(LedgerOp::ConfigureBridge { name: "ethereum".into(), config }.instruction(ADMIN_ID, String::new()))
        .await
        .expect("short ttl");
    let relayers: Vec<Relayer> = (0..3).map(|i| s.signing_only_relayer(i)).collect();
    let alice = account();
    s.deposit_minted(e, 20 * KLX, &alice).await;
    let before = e.balance(e.user).await;

    let id = s.withdraw(&alice, "ethereum", e.user, 8 * KLX).await;
    assert_eq!(s.native(&alice), 12 * KLX);
    let signed = s.ledger().withdrawal("ethereum", &id);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    s.mine_until("the refund", || {
        s.ledger().withdrawal("ethereum", &id).is_some_and(|w| w.status == WithdrawalStatus::Refunded)
    })
    .await;
    assert_eq!(s.native(&alice), 20 * KLX, "refunded");
    assert_eq!(e.balance(e.user).await, before, "nothing released");
    assert_eq!(e.locked().await, 20 * KLX);

    // The signatures collected before the expiry cannot release it now: the contract refuses.
    let w = s.ledger().withdrawal("ethereum", &id).or(signed).expect("record");
    assert!(w.signatures.len() >= 2, "the relayers signed before the expiry: {:?}", w.signatures.keys());
    {
        let sigs: Vec<alloy::primitives::Bytes> = w
            .signatures
            .values()
            .filter_map(|h| hex::decode(h.trim_start_matches("0x")).ok())
            .map(alloy::primitives::Bytes::from)
            .collect();
        let mut pairs = Vec::new();
        let id_b256: B256 = format!("0x{}", w.id).parse().expect("id");
        let digest = kalima_bridge_ethereum::contracts::release_digest(
            w.chain_id,
            *e.bridge.address(),
            *e.token.address(),
            e.user,
            U256::from(w.amount),
            id_b256,
            U256::from(w.expiry),
        );
        for sig in sigs {
            let signer = kalima_bridge_ethereum::contracts::recover_signer(&digest, &sig).expect("recover");
            pairs.push((signer, sig));
        }
        let sorted = kalima_bridge_ethereum::contracts::sort_signatures(pairs);
        let call = e.bridge.release(e.user, U256::from(w.amount), id_b256, U256::from(w.expiry), sorted);
        assert!(call.call().await.is_err(), "an expired release went through");
    }
    assert_eq!(e.balance(e.user).await, before);
    s.assert_conserved();
    for r in relayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_conservation_check_halts_the_bridge_when_the_native_ledger_is_tampered_with() {
    use kalima_core::ledger::{ACCOUNTS_ADDRESS, Account};
    use kalima_core::tx::{Transaction, TxContent};
    let s = Setup::start(&[("ethereum", 31337)]).await;
    let relayers = s.relayers();
    let e = &s.evms[0];
    let alice = account();
    s.deposit_minted(e, 50 * KLX, &alice).await;
    wait_for(
        PATIENCE,
        "a passing conservation check",
        || relayers[0].conservation.read().ok.then_some(()),
        || format!("{:?}", relayers[0].conservation.read()),
    )
    .await;

    // Mallory's balance appears in the node's memory without any mint on the chain, as a
    // corrupted or compromised node would hold it.
    let mallory = account();
    let forged = Account { balance: 1_000 * KLX, nonce: 0 };
    let tx = Transaction {
        global_sequence: u64::MAX,
        sequence: 1,
        timestamp_ms: 0,
        previous: [0; 32],
        content: TxContent {
            device_id: "_node".into(),
            address: ACCOUNTS_ADDRESS.into(),
            key: AccountKey::of(&mallory).to_hex(),
            body: serde_json::to_vec(&forged).expect("json"),
            ..TxContent::default()
        },
    };
    let committed = Arc::new(kalima_core::CommittedTx { id: tx.id(), tx, height: 0 });
    s.t.chain.memcache().apply([&committed]);
    assert_eq!(s.native(&mallory), 1_000 * KLX);

    let halted = wait_for(
        PATIENCE,
        "the bridge to halt",
        || s.ledger().bridge_state("ethereum").halted,
        || format!("{:?}", relayers[0].conservation.read()),
    )
    .await;
    assert!(halted.reason.contains("balances sum"), "{}", halted.reason);
    // Mallory cannot take the forged KLX out through the bridge.
    let w = SignedWithdrawal::sign(CHAIN, &mallory, "ethereum", &format!("{:#x}", e.user), 10 * KLX, 1);
    let refused = s.t.ledger(LedgerOp::Withdraw(w).instruction("wallet", String::new())).await;
    assert!(refused.is_err(), "a withdrawal of forged KLX was accepted");
    assert_eq!(e.locked().await, 50 * KLX);
    for r in relayers {
        r.shutdown().await;
    }
}
