//! Operator and development tools that talk to an EVM node: deploying `KlxToken` and
//! `KlxBridge` (on a local anvil, typically), minting test tokens, depositing into a bridge
//! and reading ERC20 balances. Everything takes and returns plain strings and integers so
//! the CLI that calls it needs no EVM types.

use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use alloy::transports::http::reqwest::Url;
use kalima_core::ledger::AccountKey;

use crate::contracts::{KlxBridge, KlxToken};
use crate::error::{Error, Result};
use crate::identity::Identity;

/// Constructor arguments of a `KlxBridge` deployment, and the token it locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRequest {
    /// An existing KLX ERC20 (`0x` + 40 hex); `None` deploys a new `KlxToken`.
    pub token: Option<String>,
    /// Relayer addresses (`0x` + 40 hex), in the order they are listed.
    pub relayers: Vec<String>,
    /// Relayer signatures a release needs.
    pub threshold: u64,
    /// The address allowed to pause the bridge.
    pub guardian: String,
    /// Largest single release, in base units.
    pub per_tx_cap: u128,
    /// Largest sum released per window, in base units.
    pub window_cap: u128,
    /// Window length in seconds.
    pub window_seconds: u64,
}

/// Where the contracts landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The KLX ERC20 (`0x` + 40 lowercase hex).
    pub token: String,
    /// True when this deployment created the token.
    pub token_deployed: bool,
    /// The `KlxBridge` (`0x` + 40 lowercase hex).
    pub bridge: String,
    /// EVM chain id reported by the node.
    pub chain_id: u64,
    /// Block holding the bridge's deployment: the first block relayers must scan.
    pub block: u64,
}

/// A deposit that was mined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositSent {
    /// The deposit transaction (`0x` + 64 hex).
    pub tx_hash: String,
    /// Its block.
    pub block: u64,
    /// The bridge's deposit nonce, which relayers attest in order.
    pub nonce: u64,
}

/// The Ethereum address of a relayer identity (`0x` + 40 lowercase hex).
pub fn eth_address(identity: &Identity) -> String {
    format!("{:#x}", identity.eth.address())
}

/// The address of a secp256k1 key given as hex or as a file holding the hex.
pub fn key_address(key: &str) -> Result<String> {
    Ok(format!("{:#x}", signer(key)?.address()))
}

/// Deploys the token (unless `req.token` names one) and the bridge, signed by `key` (hex or
/// a file holding it), which becomes the owner of both.
pub async fn deploy(rpc_url: &str, key: &str, req: &DeployRequest) -> Result<Deployment> {
    let relayers = req.relayers.iter().map(|r| address(r, "relayer")).collect::<Result<Vec<_>>>()?;
    if relayers.is_empty() {
        return Err(Error::Config("a bridge needs at least one relayer".into()));
    }
    // The contract checks these too; refusing here spares a transaction that would revert.
    if req.threshold == 0 || req.threshold > relayers.len() as u64 {
        return Err(Error::Config(format!(
            "threshold {} must be between 1 and the number of relayers ({})",
            req.threshold,
            relayers.len()
        )));
    }
    if req.window_seconds == 0 || req.per_tx_cap > req.window_cap {
        return Err(Error::Config(
            "the window must be above 0 s and the per-transaction cap at most the window cap".into(),
        ));
    }
    let guardian = address(&req.guardian, "guardian")?;
    let existing = req.token.as_deref().map(|t| address(t, "token")).transpose()?;
    let provider = wallet(rpc_url, signer(key)?)?;
    let chain_id = provider.get_chain_id().await.map_err(|e| Error::rpc(rpc_url, e))?;

    let (token, token_deployed) = match existing {
        Some(token) => (token, false),
        None => {
            let pending = KlxToken::deploy_builder(provider.clone())
                .send()
                .await
                .map_err(|e| call_error(rpc_url, "deploying KlxToken", e))?;
            let receipt = mined(rpc_url, "deploying KlxToken", pending).await?;
            let token = receipt
                .contract_address
                .ok_or_else(|| Error::rpc(rpc_url, "the KlxToken deployment receipt names no contract"))?;
            (token, true)
        }
    };
    let pending = KlxBridge::deploy_builder(
        provider.clone(),
        token,
        relayers,
        U256::from(req.threshold),
        guardian,
        U256::from(req.per_tx_cap),
        U256::from(req.window_cap),
        U256::from(req.window_seconds),
    )
    .send()
    .await
    .map_err(|e| call_error(rpc_url, "deploying KlxBridge", e))?;
    let receipt = mined(rpc_url, "deploying KlxBridge", pending).await?;
    let bridge = receipt
        .contract_address
        .ok_or_else(|| Error::rpc(rpc_url, "the KlxBridge deployment receipt names no contract"))?;
    let block = receipt.block_number.ok_or_else(|| Error::rpc(rpc_url, "the KlxBridge receipt has no block"))?;
    Ok(Deployment { token: format!("{token:#x}"), token_deployed, bridge: format!("{bridge:#x}"), chain_id, block })
}

/// Mints `amount` base units of `token` to `to`; only the token's owner may. Returns the
/// transaction hash.
pub async fn mint(rpc_url: &str, key: &str, token: &str, to: &str, amount: u128) -> Result<String> {
    let token = address(token, "token")?;
    let to = address(to, "recipient")?;
    let provider = wallet(rpc_url, signer(key)?)?;
    let pending = KlxToken::new(token, provider)
        .mint(to, U256::from(amount))
        .send()
        .await
        .map_err(|e| call_error(rpc_url, "mint", e))?;
    let receipt = mined(rpc_url, "mint", pending).await?;
    Ok(format!("{:#x}", receipt.transaction_hash))
}

/// Approves `bridge` for `amount` base units of its token and deposits them for the native
/// account `recipient` (64 hex), waiting for both receipts.
pub async fn deposit(rpc_url: &str, key: &str, bridge: &str, amount: u128, recipient: &str) -> Result<DepositSent> {
    let bridge_address = address(bridge, "bridge")?;
    // KLX credited to something that is not an Ed25519 key could never be spent, and the
    // bridge cannot take it back.
    let account = AccountKey::from_hex(recipient).map_err(|e| Error::Config(e.to_string()))?;
    if amount == 0 {
        return Err(Error::Config("the amount must be above 0".into()));
    }
    let provider = wallet(rpc_url, signer(key)?)?;
    let bridge = KlxBridge::new(bridge_address, provider.clone());
    let token = bridge.token().call().await.map_err(|e| call_error(rpc_url, "reading the bridge's token", e))?;
    let pending = KlxToken::new(token, provider)
        .approve(bridge_address, U256::from(amount))
        .send()
        .await
        .map_err(|e| call_error(rpc_url, "approve", e))?;
    mined(rpc_url, "approve", pending).await?;
    let pending = bridge
        .deposit(U256::from(amount), B256::from(account.0))
        .send()
        .await
        .map_err(|e| call_error(rpc_url, "deposit", e))?;
    let receipt = mined(rpc_url, "deposit", pending).await?;
    let event = receipt
        .inner
        .logs()
        .iter()
        .filter(|log| log.address() == bridge_address && log.topic0() == Some(&KlxBridge::Deposit::SIGNATURE_HASH))
        .find_map(|log| log.log_decode::<KlxBridge::Deposit>().ok())
        .ok_or_else(|| Error::rpc(rpc_url, "the deposit was mined but emitted no Deposit event"))?;
    let block = receipt.block_number.ok_or_else(|| Error::rpc(rpc_url, "the deposit receipt has no block"))?;
    Ok(DepositSent { tx_hash: format!("{:#x}", receipt.transaction_hash), block, nonce: event.inner.data.nonce })
}

/// The balance of `of` in `token`, in base units.
pub async fn erc20_balance(rpc_url: &str, token: &str, of: &str) -> Result<u128> {
    let token = address(token, "token")?;
    let of = address(of, "account")?;
    let provider = ProviderBuilder::new().connect_http(url(rpc_url)?).erased();
    let balance =
        KlxToken::new(token, provider).balanceOf(of).call().await.map_err(|e| call_error(rpc_url, "balanceOf", e))?;
    u128::try_from(balance).map_err(|_| Error::rpc(rpc_url, format!("balance {balance} does not fit in 128 bits")))
}

/// A secp256k1 key from hex (with or without `0x`) or from a file holding that hex. Error
/// messages never repeat the argument, which may be most of a secret.
fn signer(key: &str) -> Result<PrivateKeySigner> {
    let key = key.trim();
    let digits = key.strip_prefix("0x").unwrap_or(key);
    let text = if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        key.to_string()
    } else {
        std::fs::read_to_string(key)
            .map_err(|e| Error::Config(format!("the key is neither 64 hex digits nor a readable file: {e}")))?
    };
    text.trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| Error::Config("the key is not a valid secp256k1 private key".into()))
}

fn address(s: &str, what: &str) -> Result<Address> {
    s.trim().parse::<Address>().map_err(|_| Error::Config(format!("{what} {s:?} is not an address (0x + 40 hex)")))
}

fn url(rpc_url: &str) -> Result<Url> {
    rpc_url.parse().map_err(|e| Error::Config(format!("RPC URL {rpc_url:?}: {e}")))
}

/// A provider that signs with `signer` and asks the node for the nonce on every
/// transaction: a failed gas estimate then leaves no reserved nonce behind for the next one.
fn wallet(rpc_url: &str, signer: PrivateKeySigner) -> Result<DynProvider> {
    Ok(ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(signer)
        .connect_http(url(rpc_url)?)
        .erased())
}

/// Waits for the receipt and refuses a reverted transaction.
async fn mined(
    rpc_url: &str,
    what: &str,
    pending: alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
) -> Result<TransactionReceipt> {
    let receipt = pending.get_receipt().await.map_err(|e| Error::rpc(rpc_url, format!("{what}: {e}")))?;
    if !receipt.status() {
        return Err(Error::rpc(rpc_url, format!("{what}: transaction {:#x} reverted", receipt.transaction_hash)));
    }
    Ok(receipt)
}

/// An RPC error with the contract's custom error decoded when there is one, since the raw
/// revert data says nothing to a person.
fn call_error(rpc_url: &str, what: &str, e: alloy::contract::Error) -> Error {
    let detail = if let Some(err) = e.as_decoded_interface_error::<KlxBridge::KlxBridgeErrors>() {
        format!("reverted with {err:?}")
    } else if let Some(err) = e.as_decoded_interface_error::<KlxToken::KlxTokenErrors>() {
        format!("reverted with {err:?}")
    } else {
        e.to_string()
    };
    Error::rpc(rpc_url, format!("{what}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anvil::TestChain;

    const KLX: u128 = 1_000_000_000_000_000_000;

    fn hex_key(s: &PrivateKeySigner) -> String {
        format!("0x{}", hex::encode(s.to_bytes()))
    }

    fn account(seed: u8) -> String {
        hex::encode(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes())
    }

    #[tokio::test]
    async fn devtools_deploy_mint_deposit() {
        let chain = TestChain::spawn(31_337);
        let rpc = chain.endpoint().to_string();
        let owner = hex_key(&chain.signer(0));
        let user = chain.signer(5);
        let user_address = format!("{:#x}", user.address());
        // The key as a file, as an operator would keep it.
        let dir = tempfile::tempdir().unwrap();
        let user_key_file = dir.path().join("user-eth.key");
        std::fs::write(&user_key_file, format!("{}\n", hex_key(&user))).unwrap();
        let user_key = user_key_file.to_str().unwrap();
        assert_eq!(key_address(user_key).unwrap(), user_address);

        let req = DeployRequest {
            token: None,
            relayers: (2..=4).map(|i| format!("{:#x}", chain.signer(i).address())).collect(),
            threshold: 2,
            guardian: format!("{:#x}", chain.signer(1).address()),
            per_tx_cap: 1_000 * KLX,
            window_cap: 5_000 * KLX,
            window_seconds: 3_600,
        };
        let d = deploy(&rpc, &owner, &req).await.unwrap();
        assert!(d.token_deployed);
        assert_eq!(d.chain_id, 31_337);
        assert!(d.block > 0);

        let relayers = chain.provider_for(&chain.signer(0));
        let bridge = KlxBridge::new(d.bridge.parse().unwrap(), relayers);
        assert_eq!(format!("{:#x}", bridge.token().call().await.unwrap()), d.token);
        assert_eq!(bridge.threshold().call().await.unwrap(), U256::from(2u64));

        assert_eq!(erc20_balance(&rpc, &d.token, &user_address).await.unwrap(), 0);
        mint(&rpc, &owner, &d.token, &user_address, 100 * KLX).await.unwrap();
        assert_eq!(erc20_balance(&rpc, &d.token, &user_address).await.unwrap(), 100 * KLX);

        let first = deposit(&rpc, user_key, &d.bridge, 10 * KLX, &account(7)).await.unwrap();
        assert_eq!(first.nonce, 0);
        let second = deposit(&rpc, user_key, &d.bridge, 25 * KLX / 2, &account(8)).await.unwrap();
        assert_eq!(second.nonce, 1);
        assert_ne!(first.tx_hash, second.tx_hash);
        assert!(second.block > first.block);
        assert_eq!(erc20_balance(&rpc, &d.token, &user_address).await.unwrap(), 100 * KLX - 10 * KLX - 25 * KLX / 2);
        assert_eq!(erc20_balance(&rpc, &d.token, &d.bridge).await.unwrap(), 10 * KLX + 25 * KLX / 2);

        // A second bridge over the same token deploys no new token.
        let again = deploy(&rpc, &owner, &DeployRequest { token: Some(d.token.clone()), ..req }).await.unwrap();
        assert!(!again.token_deployed);
        assert_eq!(again.token, d.token);
        assert_ne!(again.bridge, d.bridge);
    }

    #[tokio::test]
    async fn devtools_refusals() {
        let chain = TestChain::spawn(31_337);
        let rpc = chain.endpoint().to_string();
        let owner = hex_key(&chain.signer(0));
        let outsider = hex_key(&chain.signer(6));
        let req = DeployRequest {
            token: None,
            relayers: vec![format!("{:#x}", chain.signer(2).address())],
            threshold: 2,
            guardian: format!("{:#x}", chain.signer(1).address()),
            per_tx_cap: KLX,
            window_cap: KLX,
            window_seconds: 60,
        };
        assert!(matches!(deploy(&rpc, &owner, &req).await, Err(Error::Config(_))));
        let d = deploy(&rpc, &owner, &DeployRequest { threshold: 1, ..req }).await.unwrap();

        // Only the owner mints; the revert is named.
        let to = format!("{:#x}", chain.signer(6).address());
        match mint(&rpc, &outsider, &d.token, &to, KLX).await {
            Err(Error::Rpc { message, .. }) => assert!(message.contains("OwnableUnauthorizedAccount"), "{message}"),
            other => panic!("expected a revert, got {other:?}"),
        }
        // Not an Ed25519 key: refused before anything is sent.
        assert!(matches!(deposit(&rpc, &owner, &d.bridge, KLX, &"ab".repeat(31)).await, Err(Error::Config(_))));
        // Without tokens, the deposit reverts and nothing is taken.
        let e = deposit(&rpc, &outsider, &d.bridge, KLX, &account(9)).await.unwrap_err();
        assert!(matches!(e, Error::Rpc { .. }), "{e}");
        assert_eq!(erc20_balance(&rpc, &d.token, &d.bridge).await.unwrap(), 0);
    }

    #[test]
    fn devtools_key_errors_do_not_echo_the_key() {
        let almost = "1".repeat(63);
        let e = signer(&almost).unwrap_err().to_string();
        assert!(!e.contains(&almost), "{e}");
        assert!(signer(&format!("0x{}", "0".repeat(64))).is_err(), "zero is not a valid key");
        assert!(address("0x12", "token").is_err());
    }
}
