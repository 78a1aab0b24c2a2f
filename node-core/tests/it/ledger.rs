//! Native KLX: transfers, and the chain side of the bridge (quorum mints in nonce order,
//! burns, release signatures, halts). Every scenario checks balances and supply.

use ed25519_dalek::SigningKey;
use kalima_core::keys::NodeKey;
use kalima_core::ledger::{
    AccountKey, BridgeChain, Deposit, DepositStatus, KLX, KLX_SUPPLY_CAP, Ledger, LedgerError, LedgerOp, Relayer,
    SignedTransfer, SignedWithdrawal, WithdrawalStatus, relayer_instruction,
};
use kalima_core::registry::ADMIN_ID;
use kalima_core::testing::TestChain;
use kalima_core::{Error, Rejection};

pub(crate) const CHAIN: &str = "ledger-test";
const TOKEN: &str = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
const BRIDGE: &str = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512";

pub(crate) struct Bridge {
    pub(crate) t: TestChain,
    relayers: Vec<(String, NodeKey)>,
    idem: std::sync::atomic::AtomicU64,
}

pub(crate) fn account() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

fn config(relayers: &[(String, NodeKey)], threshold: u32) -> BridgeChain {
    config_ttl(relayers, threshold, 3600)
}

fn config_ttl(relayers: &[(String, NodeKey)], threshold: u32, release_ttl_secs: u64) -> BridgeChain {
    BridgeChain {
        chain_id: 31337,
        bridge: BRIDGE.into(),
        token: TOKEN.into(),
        relayers: relayers
            .iter()
            .enumerate()
            .map(|(i, (d, _))| Relayer { device: d.clone(), eth_address: format!("0x{:040x}", i + 1) })
            .collect(),
        threshold,
        release_ttl_secs,
        max_withdrawal: 1_000 * KLX,
    }
}

pub(crate) fn refusal(r: kalima_core::Result<Vec<kalima_core::Receipt>>) -> Rejection {
    match r {
        Err(Error::Rejected(rej)) => rej,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub(crate) fn ledger_refusal(r: kalima_core::Result<Vec<kalima_core::Receipt>>) -> LedgerError {
    match refusal(r) {
        Rejection::Ledger(e) => e,
        other => panic!("expected a ledger refusal, got {other:?}"),
    }
}

impl Bridge {
    /// A chain with `n` relayers and a `threshold`-of-`n` bridge named `eth`.
    async fn start(n: usize, threshold: u32) -> Bridge {
        let t = TestChain::start(CHAIN).await;
        let mut relayers = Vec::new();
        for i in 0..n {
            let id = format!("relayer-{i}");
            let key = t.register_signing(&id).await;
            relayers.push((id, key));
        }
        let b = Bridge { t, relayers, idem: Default::default() };
        b.admin(LedgerOp::ConfigureBridge { name: "eth".into(), config: config(&b.relayers, threshold) })
            .await
            .expect("configure bridge");
        b
    }

    fn key(&self) -> String {
        format!("k{}", self.idem.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    pub(crate) async fn admin(&self, op: LedgerOp) -> kalima_core::Result<Vec<kalima_core::Receipt>> {
        self.t.ledger(op.instruction(ADMIN_ID, String::new())).await
    }

    async fn relayer(&self, i: usize, op: LedgerOp) -> kalima_core::Result<Vec<kalima_core::Receipt>> {
        let (id, key) = &self.relayers[i];
        self.t.ledger(relayer_instruction(CHAIN, &op, id, self.key(), key)).await
    }

    pub(crate) async fn attest(&self, i: usize, d: &Deposit) -> kalima_core::Result<Vec<kalima_core::Receipt>> {
        self.relayer(i, LedgerOp::AttestDeposit { chain: "eth".into(), deposit: d.clone() }).await
    }

    /// Any registered device may carry a holder's signed instruction.
    pub(crate) async fn holder(&self, op: LedgerOp) -> kalima_core::Result<Vec<kalima_core::Receipt>> {
        self.t.ledger(op.instruction("wallet", String::new())).await
    }

    pub(crate) fn ledger(&self) -> Ledger<'_> {
        Ledger::new(self.t.chain.memcache())
    }

    pub(crate) fn balance(&self, k: &SigningKey) -> u128 {
        self.ledger().account(&AccountKey::of(k)).balance
    }

    /// Sum of balances equals the supply in circulation, and the bridge totals agree.
    pub(crate) fn assert_conserved(&self) {
        let l = self.ledger();
        let total: u128 = l.accounts().iter().map(|(_, a)| a.balance).sum();
        let supply = l.supply();
        assert_eq!(total, supply.circulating(), "balances {total} differ from supply {supply:?}");
        let s = l.bridge_state("eth");
        assert_eq!(s.minted, supply.minted, "bridge minted vs supply");
        assert_eq!(s.burned, supply.burned, "bridge burned vs supply");
    }
}

pub(crate) fn deposit(nonce: u64, to: &SigningKey, amount: u128) -> Deposit {
    Deposit {
        nonce,
        tx_hash: format!("0x{:064x}", 0xabc0 + nonce),
        log_index: 3,
        block_number: 100 + nonce,
        from: "0x70997970c51812dc3a010c7d01b50e0d17dc79c8".into(),
        recipient: AccountKey::of(to).to_hex(),
        amount,
        token: TOKEN.into(),
    }
}

pub(crate) async fn with_wallet(n: usize, threshold: u32) -> Bridge {
    let b = Bridge::start(n, threshold).await;
    b.t.register("wallet", &[]).await;
    b
}

#[tokio::test]
async fn a_deposit_is_minted_once_when_a_majority_of_relayers_attest_the_same_event() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    let d = deposit(0, &alice, 5 * KLX);

    b.attest(0, &d).await.expect("first attestation");
    assert_eq!(b.balance(&alice), 0, "one attestation of three must not mint");
    let rec = b.ledger().deposit("eth", 0).expect("pending record");
    assert_eq!(rec.status, DepositStatus::Pending);
    assert_eq!(rec.votes.len(), 1);

    // The same relayer repeating itself does not count twice.
    let again = b.attest(0, &d).await;
    assert!(matches!(ledger_refusal(again), LedgerError::AlreadyAttested { .. }));
    assert_eq!(b.balance(&alice), 0);

    b.attest(1, &d).await.expect("second attestation");
    assert_eq!(b.balance(&alice), 5 * KLX, "two of three agreeing mint");
    let rec = b.ledger().deposit("eth", 0).expect("minted record");
    assert_eq!(rec.status, DepositStatus::Minted);
    assert_eq!(rec.minted.as_ref().map(|m| m.amount), Some(5 * KLX));
    assert_eq!(b.ledger().bridge_state("eth").next_deposit, 1);

    // The third relayer arrives late: refused as already minted, nothing minted twice.
    let late = b.attest(2, &d).await;
    assert!(matches!(ledger_refusal(late), LedgerError::AlreadyMinted { nonce: 0, .. }));
    assert_eq!(b.balance(&alice), 5 * KLX);
    assert_eq!(b.ledger().supply().minted, 5 * KLX);
    b.assert_conserved();
}

#[tokio::test]
async fn disagreeing_relayers_mint_nothing_until_a_majority_agrees() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    let honest = deposit(0, &alice, 10 * KLX);
    let mut forged = honest.clone();
    forged.amount = 1_000 * KLX;

    b.attest(0, &forged).await.expect("forged attestation is recorded");
    b.attest(1, &honest).await.expect("honest attestation");
    assert_eq!(b.balance(&alice), 0, "one vote each: no quorum");
    b.attest(2, &honest).await.expect("second honest attestation");
    assert_eq!(b.balance(&alice), 10 * KLX, "the version two relayers saw is minted");
    b.assert_conserved();
}

#[tokio::test]
async fn deposits_are_minted_in_nonce_order_even_when_a_later_one_completes_first() {
    let b = with_wallet(3, 2).await;
    let (alice, bob) = (account(), account());
    let d0 = deposit(0, &alice, KLX);
    let d1 = deposit(1, &bob, 2 * KLX);

    b.attest(0, &d1).await.expect("d1 vote 1");
    b.attest(1, &d1).await.expect("d1 vote 2");
    assert_eq!(b.balance(&bob), 0, "nonce 1 waits for nonce 0");
    assert_eq!(b.ledger().bridge_state("eth").next_deposit, 0);

    b.attest(0, &d0).await.expect("d0 vote 1");
    b.attest(2, &d0).await.expect("d0 vote 2");
    assert_eq!(b.balance(&alice), KLX);
    assert_eq!(b.balance(&bob), 2 * KLX, "nonce 1 is minted right after nonce 0");
    assert_eq!(b.ledger().bridge_state("eth").next_deposit, 2);
    assert!(b.ledger().pending_deposits("eth").is_empty());

    let far = deposit(2 + kalima_core::ledger::MAX_PENDING_DEPOSITS, &alice, KLX);
    assert!(matches!(ledger_refusal(b.attest(0, &far).await), LedgerError::OutOfWindow { .. }));
    b.assert_conserved();
}

#[tokio::test]
async fn only_relayers_signing_with_their_own_key_attest() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    let d = deposit(0, &alice, KLX);
    let op = LedgerOp::AttestDeposit { chain: "eth".into(), deposit: d.clone() };

    // A device that is not a relayer, signing with its own key.
    let mallory = b.t.register_signing("mallory").await;
    let r = b.t.ledger(relayer_instruction(CHAIN, &op, "mallory", "m1".into(), &mallory)).await;
    assert!(matches!(ledger_refusal(r), LedgerError::NotRelayer { .. }));

    // A relayer's id with another key: ingest would stop it, and so does the applier.
    let r = b.t.ledger(relayer_instruction(CHAIN, &op, "relayer-0", "m2".into(), &mallory)).await;
    assert!(matches!(ledger_refusal(r), LedgerError::NotRelayer { .. }));

    // Signed for another chain.
    let r = b.t.ledger(relayer_instruction("other-chain", &op, "relayer-1", "m3".into(), &b.relayers[1].1)).await;
    assert!(matches!(ledger_refusal(r), LedgerError::NotRelayer { .. }));

    // Unsigned.
    let r = b.t.ledger(op.instruction("relayer-2", "m4".into())).await;
    assert!(matches!(ledger_refusal(r), LedgerError::NotRelayer { .. }));

    // Written at an address that does not match the instruction.
    let mut misplaced = relayer_instruction(CHAIN, &op, "relayer-0", "m5".into(), &b.relayers[0].1);
    misplaced.key = "relayer-1".into();
    assert!(matches!(ledger_refusal(b.t.ledger(misplaced).await), LedgerError::Invalid(_)));

    assert_eq!(b.balance(&alice), 0);
    assert!(b.ledger().deposit("eth", 0).is_none(), "no vote was recorded");
}

#[tokio::test]
async fn a_relayer_removed_from_the_set_no_longer_counts() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    let d = deposit(0, &alice, KLX);
    b.attest(0, &d).await.expect("vote of relayer-0");
    // relayer-0 leaves; relayer-3 joins.
    let key3 = b.t.register_signing("relayer-3").await;
    let mut set: Vec<(String, NodeKey)> = b.relayers[1..].to_vec();
    set.push(("relayer-3".into(), key3));
    b.admin(LedgerOp::ConfigureBridge { name: "eth".into(), config: config(&set, 2) }).await.expect("new set");
    b.attest(1, &d).await.expect("vote of relayer-1");
    assert_eq!(b.balance(&alice), 0, "a removed relayer's vote does not count");
    b.attest(2, &d).await.expect("vote of relayer-2");
    assert_eq!(b.balance(&alice), KLX);
    let r = b.attest(0, &deposit(1, &alice, KLX)).await;
    assert!(matches!(ledger_refusal(r), LedgerError::NotRelayer { .. }));
}

#[tokio::test]
async fn bridge_configuration_refuses_unsafe_thresholds_and_unknown_relayers() {
    let b = with_wallet(3, 2).await;
    let set = b.relayers.clone();
    for (threshold, why) in [(0, "zero"), (1, "not a majority of 3"), (4, "above N")] {
        let r = b.admin(LedgerOp::ConfigureBridge { name: "eth2".into(), config: config(&set, threshold) }).await;
        assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)), "threshold {threshold} ({why}) accepted");
    }
    let mut dup = config(&set, 2);
    dup.relayers[1].eth_address = dup.relayers[0].eth_address.clone();
    let r = b.admin(LedgerOp::ConfigureBridge { name: "eth2".into(), config: dup }).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)), "duplicate relayer accepted");
    let mut ghost = config(&set, 2);
    ghost.relayers[2].device = "nobody".into();
    let r = b.admin(LedgerOp::ConfigureBridge { name: "eth2".into(), config: ghost }).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)), "unregistered relayer accepted");
    let mut zero = config(&set, 2);
    zero.bridge = "0x0000000000000000000000000000000000000000".into();
    let r = b.admin(LedgerOp::ConfigureBridge { name: "eth2".into(), config: zero }).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)), "zero bridge address accepted");
    // Only the admin configures.
    let op = LedgerOp::ConfigureBridge { name: "eth2".into(), config: config(&set, 2) };
    assert!(matches!(
        ledger_refusal(b.t.ledger(op.instruction("wallet", String::new())).await),
        LedgerError::AdminOnly
    ));
    assert!(b.ledger().bridge("eth2").is_none());

    // Once funds moved, the contract behind a name cannot change.
    let alice = account();
    b.attest(0, &deposit(0, &alice, KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, KLX)).await.expect("vote");
    let mut moved = config(&set, 2);
    moved.bridge = "0x1111111111111111111111111111111111111111".into();
    let r = b.admin(LedgerOp::ConfigureBridge { name: "eth".into(), config: moved }).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)));
    assert_eq!(b.ledger().bridge("eth").map(|c| c.bridge), Some(BRIDGE.to_string()));
}

#[tokio::test]
async fn transfers_need_the_holder_signature_the_next_nonce_and_the_funds() {
    let b = with_wallet(3, 2).await;
    let (alice, bob) = (account(), account());
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");

    let t1 = SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&bob), 3 * KLX, 1);
    b.holder(LedgerOp::Transfer(t1.clone())).await.expect("transfer");
    assert_eq!((b.balance(&alice), b.balance(&bob)), (7 * KLX, 3 * KLX));

    // Replaying the same signed transfer fails on its nonce.
    let r = ledger_refusal(b.holder(LedgerOp::Transfer(t1)).await);
    assert!(matches!(r, LedgerError::BadNonce { expected: 2, got: 1, .. }), "{r:?}");

    // Bob cannot spend Alice's money by naming her as the payer.
    let mut stolen = SignedTransfer::sign(CHAIN, &bob, &AccountKey::of(&bob), KLX, 2);
    stolen.from = AccountKey::of(&alice).to_hex();
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Transfer(stolen)).await), LedgerError::BadAccountSignature(_)));

    // A tampered amount breaks the signature.
    let mut tampered = SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&bob), KLX, 2);
    tampered.amount = 7 * KLX;
    assert!(matches!(
        ledger_refusal(b.holder(LedgerOp::Transfer(tampered)).await),
        LedgerError::BadAccountSignature(_)
    ));

    // Signed for another chain.
    let other = SignedTransfer::sign("other-chain", &alice, &AccountKey::of(&bob), KLX, 2);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Transfer(other)).await), LedgerError::BadAccountSignature(_)));

    let over = SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&bob), 8 * KLX, 2);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Transfer(over)).await), LedgerError::InsufficientFunds { .. }));

    let to_self = SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&alice), KLX, 2);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Transfer(to_self)).await), LedgerError::Invalid(_)));

    assert_eq!((b.balance(&alice), b.balance(&bob)), (7 * KLX, 3 * KLX), "refusals moved nothing");
    b.assert_conserved();
}

#[tokio::test]
async fn a_withdrawal_burns_then_collects_release_signatures_then_is_reported_released() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    let to = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

    let over = SignedWithdrawal::sign(CHAIN, &alice, "eth", to, 1_001 * KLX, 1);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Withdraw(over)).await), LedgerError::OverCap { .. }));
    let nowhere = SignedWithdrawal::sign(CHAIN, &alice, "solana", to, KLX, 1);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Withdraw(nowhere)).await), LedgerError::UnknownBridge(_)));
    let zero_to = SignedWithdrawal::sign(CHAIN, &alice, "eth", "0x0000000000000000000000000000000000000000", KLX, 1);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Withdraw(zero_to)).await), LedgerError::Invalid(_)));

    let w = SignedWithdrawal::sign(CHAIN, &alice, "eth", to, 4 * KLX, 1);
    b.holder(LedgerOp::Withdraw(w)).await.expect("withdrawal");
    assert_eq!(b.balance(&alice), 6 * KLX);
    let pending = b.ledger().pending_withdrawals("eth");
    assert_eq!(pending.len(), 1);
    let wd = pending[0].clone();
    assert_eq!(wd.id, kalima_core::ledger::withdrawal_id(CHAIN, "eth", 0));
    assert_eq!(
        (wd.amount, wd.recipient.as_str(), wd.chain_id, wd.status),
        (4 * KLX, &*to.to_lowercase(), 31337, WithdrawalStatus::Signing)
    );
    assert_eq!(wd.bridge, BRIDGE);
    assert!(wd.expiry * 1000 >= wd.requested_at_ms as u64 + 3_600_000 - 1000, "expiry is burn time + ttl");
    assert_eq!(b.ledger().supply().burned, 4 * KLX);
    b.assert_conserved();

    let sig = |n: u8| format!("0x{}", hex::encode([n; 65]));
    let sign = |_relayer: usize, n: u8| LedgerOp::SignRelease {
        chain: "eth".into(),
        withdrawal: wd.id.clone(),
        signature: sig(n),
    };
    b.relayer(0, sign(0, 1)).await.expect("signature 1");
    assert!(matches!(ledger_refusal(b.relayer(0, sign(0, 9)).await), LedgerError::AlreadyAttested { .. }));
    assert_eq!(b.ledger().withdrawal("eth", &wd.id).map(|w| w.status), Some(WithdrawalStatus::Signing));
    b.relayer(1, sign(1, 2)).await.expect("signature 2");
    let ready = b.ledger().withdrawal("eth", &wd.id).expect("record");
    assert_eq!(ready.status, WithdrawalStatus::Ready);
    assert_eq!(ready.signatures.len(), 2);
    let bad = LedgerOp::SignRelease { chain: "eth".into(), withdrawal: wd.id.clone(), signature: "0x1234".into() };
    assert!(matches!(ledger_refusal(b.relayer(2, bad).await), LedgerError::Invalid(_)));

    let report = LedgerOp::ReportRelease {
        chain: "eth".into(),
        withdrawal: wd.id.clone(),
        tx_hash: format!("0x{:064x}", 77),
        block_number: 12,
    };
    b.relayer(2, report.clone()).await.expect("report");
    let done = b.ledger().withdrawal("eth", &wd.id).expect("record");
    assert_eq!(done.status, WithdrawalStatus::Released);
    assert_eq!(done.release.as_ref().map(|r| r.reported_by.as_str()), Some("relayer-2"));
    assert!(matches!(ledger_refusal(b.relayer(0, report).await), LedgerError::AlreadyAttested { .. }));
    assert_eq!(b.ledger().bridge_state("eth").released, 4 * KLX);
    assert!(b.ledger().pending_withdrawals("eth").is_empty());
    b.assert_conserved();
}

#[tokio::test]
async fn a_halted_bridge_mints_burns_and_signs_nothing_until_the_admin_resumes_it() {
    let b = with_wallet(3, 2).await;
    let alice = account();
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    let w = SignedWithdrawal::sign(CHAIN, &alice, "eth", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", KLX, 1);
    b.holder(LedgerOp::Withdraw(w)).await.expect("withdrawal");
    let wid = kalima_core::ledger::withdrawal_id(CHAIN, "eth", 0);

    b.relayer(2, LedgerOp::Halt { chain: "eth".into(), reason: "minted exceeds locked".into() }).await.expect("halt");
    let halt = b.ledger().bridge_state("eth").halted.expect("halted");
    assert_eq!((halt.by.as_str(), halt.reason.as_str()), ("relayer-2", "minted exceeds locked"));

    let d1 = deposit(1, &alice, KLX);
    assert!(matches!(ledger_refusal(b.attest(0, &d1).await), LedgerError::Halted { .. }));
    let w2 = SignedWithdrawal::sign(CHAIN, &alice, "eth", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", KLX, 2);
    assert!(matches!(ledger_refusal(b.holder(LedgerOp::Withdraw(w2.clone())).await), LedgerError::Halted { .. }));
    let sign = LedgerOp::SignRelease {
        chain: "eth".into(),
        withdrawal: wid.clone(),
        signature: format!("0x{}", "11".repeat(65)),
    };
    assert!(matches!(ledger_refusal(b.relayer(0, sign.clone()).await), LedgerError::Halted { .. }));
    assert_eq!(b.balance(&alice), 9 * KLX);

    // Relayers cannot lift it; the admin can.
    let r = b.relayer(0, LedgerOp::ResumeBridge { name: "eth".into() }).await;
    assert!(matches!(refusal(r), Rejection::Ledger(LedgerError::Invalid(_) | LedgerError::AdminOnly)));
    b.admin(LedgerOp::ResumeBridge { name: "eth".into() }).await.expect("resume");
    b.holder(LedgerOp::Withdraw(w2)).await.expect("withdrawal after resume");
    b.relayer(0, sign).await.expect("signature after resume");
    assert_eq!(b.balance(&alice), 8 * KLX);
    b.assert_conserved();
}

#[tokio::test]
async fn a_mint_past_the_supply_cap_halts_the_bridge_instead() {
    let b = with_wallet(1, 1).await;
    let alice = account();
    b.attest(0, &deposit(0, &alice, KLX_SUPPLY_CAP)).await.expect("the whole cap");
    assert_eq!(b.balance(&alice), KLX_SUPPLY_CAP);
    b.attest(0, &deposit(1, &alice, 1)).await.expect("the vote is kept");
    assert_eq!(b.balance(&alice), KLX_SUPPLY_CAP, "nothing minted past the cap");
    let s = b.ledger().bridge_state("eth");
    assert!(s.halted.is_some_and(|h| h.reason.contains("supply cap")), "the bridge halts");
    assert_eq!(s.next_deposit, 1);
    b.assert_conserved();
}

#[tokio::test]
async fn the_ledger_is_restored_from_the_store_after_a_restart() {
    let b = with_wallet(3, 2).await;
    let (alice, bob) = (account(), account());
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.holder(LedgerOp::Transfer(SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&bob), 4 * KLX, 1)))
        .await
        .expect("transfer");
    // Every change is a transaction of the chain, with its history.
    let history = b.t.history(kalima_core::ledger::ACCOUNTS_ADDRESS, &AccountKey::of(&alice).to_hex()).await;
    assert_eq!(history.len(), 2, "mint then transfer");
    let reopened = b.t.reopen().await;
    let l = Ledger::new(reopened.chain.memcache());
    assert_eq!(l.account(&AccountKey::of(&alice)).balance, 6 * KLX);
    assert_eq!(l.account(&AccountKey::of(&bob)).balance, 4 * KLX);
    assert_eq!(l.account(&AccountKey::of(&alice)).nonce, 1);
    assert_eq!(l.supply().minted, 10 * KLX);
}

#[tokio::test]
async fn a_withdrawal_that_expires_unreleased_is_refunded_on_a_quorum_and_can_never_be_released() {
    let b = with_wallet(3, 2).await;
    b.admin(LedgerOp::ConfigureBridge { name: "eth".into(), config: config_ttl(&b.relayers, 2, 1) })
        .await
        .expect("one-second release ttl");
    let alice = account();
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    let w = SignedWithdrawal::sign(CHAIN, &alice, "eth", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", 4 * KLX, 1);
    b.holder(LedgerOp::Withdraw(w)).await.expect("withdrawal");
    let wid = kalima_core::ledger::withdrawal_id(CHAIN, "eth", 0);
    let expire = LedgerOp::ExpireWithdrawal { chain: "eth".into(), withdrawal: wid.clone() };
    // Before its expiry, no refund.
    assert!(matches!(ledger_refusal(b.relayer(0, expire.clone()).await), LedgerError::Invalid(_)));
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    b.relayer(0, expire.clone()).await.expect("first expiry vote");
    assert_eq!(b.balance(&alice), 6 * KLX, "one vote of three refunds nothing");
    assert!(matches!(ledger_refusal(b.relayer(0, expire.clone()).await), LedgerError::AlreadyAttested { .. }));
    b.relayer(1, expire.clone()).await.expect("second expiry vote");
    assert_eq!(b.balance(&alice), 10 * KLX, "refunded on a quorum");
    let rec = b.ledger().withdrawal("eth", &wid).expect("record");
    assert_eq!(rec.status, WithdrawalStatus::Refunded);
    assert_eq!(b.ledger().supply().burned, 0);
    assert_eq!(b.ledger().bridge_state("eth").burned, 0);
    b.assert_conserved();

    // Refunded: it cannot be signed, refunded again, or reported released.
    let sign = LedgerOp::SignRelease {
        chain: "eth".into(),
        withdrawal: wid.clone(),
        signature: format!("0x{}", "11".repeat(65)),
    };
    assert!(matches!(ledger_refusal(b.relayer(2, sign).await), LedgerError::UnknownWithdrawal(_)));
    assert!(matches!(ledger_refusal(b.relayer(2, expire).await), LedgerError::UnknownWithdrawal(_)));
    let report = LedgerOp::ReportRelease {
        chain: "eth".into(),
        withdrawal: wid,
        tx_hash: format!("0x{:064x}", 5),
        block_number: 9,
    };
    assert!(matches!(ledger_refusal(b.relayer(2, report).await), LedgerError::Invalid(_)));
    assert_eq!(b.balance(&alice), 10 * KLX);
}

#[tokio::test]
async fn exchanges_register_their_addresses_within_the_limits_and_see_their_flows() {
    let b = with_wallet(3, 2).await;
    b.t.register("exchange-a", &[]).await;
    let register = |id: &str, device: &str| LedgerOp::RegisterExchange { id: id.into(), device: device.into() };
    // Only the admin registers exchanges, managed by a registered device.
    let r = b.t.ledger(register("acme", "exchange-a").instruction("wallet", String::new())).await;
    assert!(matches!(ledger_refusal(r), LedgerError::AdminOnly));
    assert!(matches!(ledger_refusal(b.admin(register("acme", "nobody")).await), LedgerError::Invalid(_)));
    b.admin(register("acme", "exchange-a")).await.expect("register acme");
    assert!(matches!(ledger_refusal(b.admin(register("acme", "exchange-a")).await), LedgerError::Invalid(_)));

    let (alice, bob) = (account(), account());
    let add = |ex: &str, accounts: Vec<String>| LedgerOp::AddExchangeAddresses { exchange: ex.into(), accounts };
    // Another device cannot add addresses to acme.
    let op = add("acme", vec![AccountKey::of(&alice).to_hex()]);
    assert!(matches!(
        ledger_refusal(b.t.ledger(op.instruction("wallet", String::new())).await),
        LedgerError::Invalid(_)
    ));
    b.t.ledger(op.instruction("exchange-a", String::new())).await.expect("add alice");
    // Repeating an address is harmless; too many per call, or none, is refused.
    b.t.ledger(add("acme", vec![AccountKey::of(&alice).to_hex()]).instruction("exchange-a", String::new()))
        .await
        .expect("repeat");
    let many =
        (0..kalima_core::ledger::MAX_ADDRESSES_PER_CALL + 1).map(|_| AccountKey::of(&account()).to_hex()).collect();
    let r = b.t.ledger(add("acme", many).instruction("exchange-a", String::new())).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)));
    assert_eq!(b.ledger().exchange("acme").map(|e| e.addresses), Some(1));
    assert_eq!(b.ledger().exchange_of(&AccountKey::of(&alice).to_hex()).as_deref(), Some("acme"));

    // Flows to and from its addresses are totalled; bob's are not its.
    b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
    b.attest(0, &deposit(1, &bob, 3 * KLX)).await.expect("vote");
    b.attest(1, &deposit(1, &bob, 3 * KLX)).await.expect("vote");
    let w = SignedWithdrawal::sign(CHAIN, &alice, "eth", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", 4 * KLX, 1);
    b.holder(LedgerOp::Withdraw(w)).await.expect("withdrawal");
    let ex = b.ledger().exchange("acme").expect("acme");
    assert_eq!((ex.deposited, ex.withdrawn), (10 * KLX, 4 * KLX));

    // An address belongs to one exchange.
    b.admin(register("other", "exchange-a")).await.expect("register other");
    let r =
        b.t.ledger(add("other", vec![AccountKey::of(&alice).to_hex()]).instruction("exchange-a", String::new())).await;
    assert!(matches!(ledger_refusal(r), LedgerError::Invalid(_)));

    // At most 100 exchanges.
    for i in 2..kalima_core::ledger::MAX_EXCHANGES {
        b.admin(register(&format!("ex-{i}"), "exchange-a")).await.expect("register");
    }
    assert!(matches!(ledger_refusal(b.admin(register("one-too-many", "exchange-a")).await), LedgerError::Invalid(_)));
    b.assert_conserved();
}

#[tokio::test]
async fn verify_replays_the_ledger_and_finds_it_adds_up() {
    let b = with_wallet(3, 2).await;
    let (alice, bob) = (account(), account());
    for (n, who, amount) in [(0, &alice, 10 * KLX), (1, &bob, 5 * KLX)] {
        b.attest(0, &deposit(n, who, amount)).await.expect("vote");
        b.attest(1, &deposit(n, who, amount)).await.expect("vote");
    }
    b.holder(LedgerOp::Transfer(SignedTransfer::sign(CHAIN, &alice, &AccountKey::of(&bob), 3 * KLX, 1)))
        .await
        .expect("transfer");
    let w = SignedWithdrawal::sign(CHAIN, &bob, "eth", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", 2 * KLX, 1);
    b.holder(LedgerOp::Withdraw(w)).await.expect("withdrawal");
    let report = kalima_core::verify::verify_chain(b.t.chain.store(), CHAIN, |_| {}).await.expect("the chain verifies");
    assert!(report.transactions > 20, "{report:?}");
}

#[tokio::test]
async fn verify_finds_a_balance_that_no_mint_explains() {
    use kalima_core::ledger::{ACCOUNTS_ADDRESS, Account};
    use kalima_core::tx::TxContent;
    for (writer, expected) in [("_node", "balances sum"), (ADMIN_ID, "not by the node")] {
        let b = with_wallet(3, 2).await;
        let alice = account();
        b.attest(0, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
        b.attest(1, &deposit(0, &alice, 10 * KLX)).await.expect("vote");
        // A balance record that did not come from a ledger instruction (the write path
        // refuses system addresses; a bug or a compromised node inside it would not).
        let forged = TxContent {
            device_id: writer.into(),
            address: ACCOUNTS_ADDRESS.into(),
            key: AccountKey::of(&account()).to_hex(),
            body: serde_json::to_vec(&Account { balance: 1_000 * KLX, nonce: 0 }).expect("json"),
            ..TxContent::default()
        };
        b.t.chain.submit(vec![forged], None).await.expect("stored");
        let err =
            kalima_core::verify::verify_chain(b.t.chain.store(), CHAIN, |_| {}).await.expect_err("must not verify");
        assert!(err.to_string().contains(expected), "{writer}: {err}");
    }
}
