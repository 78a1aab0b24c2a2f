//! The `KlxToken` and `KlxBridge` contracts on a real anvil: artifacts in sync with the
//! sources, deposits, threshold-signed releases and every rejection path, pause, rate limits
//! and relayer-set administration. Every test that moves money checks balances on chain.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use alloy::contract::{Error as ContractCallError, SolCallBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::DynProvider;
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use kalima_bridge_ethereum::anvil::{BridgeConfig, TestChain};
use kalima_bridge_ethereum::contracts::KlxBridge::{self, KlxBridgeErrors, KlxBridgeInstance};
use kalima_bridge_ethereum::contracts::KlxToken::{self, KlxTokenErrors, KlxTokenInstance};
use kalima_bridge_ethereum::contracts::{recover_signer, release_digest, sign_release, sort_signatures};

alloy::sol!(
    #[sol(rpc)]
    FeeOnTransferToken,
    "contracts/out/test/FeeOnTransferToken.json"
);

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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `node <script> --check` in `dir`, failing with the install hint when node is missing.
fn run_check(dir: &Path, script: &Path) -> Output {
    let output = Command::new("node")
        .arg(script)
        .arg("--check")
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}); run scripts/peers/install"));
    assert_ne!(
        output.status.code(),
        Some(2),
        "build.js could not compile; run scripts/peers/install\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn artifacts_are_up_to_date() {
    let root = workspace_root();
    let output = run_check(&root, Path::new("bridges/ethereum/contracts/build.js"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn artifact_check_detects_a_changed_source() {
    let contracts = workspace_root().join("bridges/ethereum/contracts");
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("contracts");
    for dir in ["test", "out/test"] {
        std::fs::create_dir_all(copy.join(dir)).expect("mkdir");
    }
    for name in [
        "build.js",
        "KlxToken.sol",
        "KlxBridge.sol",
        "test/FeeOnTransferToken.sol",
        "out/KlxToken.json",
        "out/KlxBridge.json",
        "out/test/FeeOnTransferToken.json",
    ] {
        std::fs::copy(contracts.join(name), copy.join(name)).expect("copy contracts");
    }

    // Unchanged sources in another directory still match: the artifacts do not depend on
    // where the repository lives.
    let output = run_check(tmp.path(), &copy.join("build.js"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let source = std::fs::read_to_string(copy.join("KlxBridge.sol")).expect("read source");
    let changed = source.replace(r#"EIP712("KlxBridge", "1")"#, r#"EIP712("KlxBridge", "2")"#);
    assert_ne!(source, changed, "the domain version literal moved; update this test");
    std::fs::write(copy.join("KlxBridge.sol"), changed).expect("write source");

    let output = run_check(tmp.path(), &copy.join("build.js"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("KlxBridge.json"), "{stderr}");
    assert!(!stderr.contains("KlxToken.json"), "{stderr}");
    assert!(stderr.contains("node bridges/ethereum/contracts/build.js"), "{stderr}");
}

#[tokio::test]
async fn token_is_capped_klx() {
    let f = Fixture::new().await;
    assert_eq!(f.token.name().call().await.expect("name"), "Kalima");
    assert_eq!(f.token.symbol().call().await.expect("symbol"), "KLX");
    assert_eq!(f.token.decimals().call().await.expect("decimals"), 18);
    assert_eq!(f.token.cap().call().await.expect("cap"), klx(480_000_000_000));
    let supply = f.token.totalSupply().call().await.expect("totalSupply");
    let cap = klx(480_000_000_000);
    let over = cap - supply + U256::from(1u8);
    let err = send(f.token.mint(f.user.address(), over)).await.expect_err("mint above the cap");
    assert_eq!(
        err.as_decoded_interface_error::<KlxTokenErrors>(),
        Some(KlxTokenErrors::ERC20ExceededCap(KlxToken::ERC20ExceededCap {
            increasedSupply: cap + U256::from(1u8),
            cap
        }))
    );
    let err = send(f.token_as(&f.user).mint(f.user.address(), U256::from(1u8))).await.expect_err("mint by non-owner");
    assert_eq!(
        err.as_decoded_interface_error::<KlxTokenErrors>(),
        Some(KlxTokenErrors::OwnableUnauthorizedAccount(KlxToken::OwnableUnauthorizedAccount {
            account: f.user.address()
        }))
    );
    assert_eq!(f.token.totalSupply().call().await.expect("totalSupply"), supply);
}

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
