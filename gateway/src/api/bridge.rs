//! `/api/v1/bridge`: the Ethereum/Polygon bridge for exchanges — bridged chains and their
//! totals, deposit status (by source transaction or nonce), withdrawal requests and status,
//! the relayer's status, and the admin's bridge configuration.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use kalima_bridge_ethereum::{ChainStatus, Conservation, FoundDeposit};
use kalima_core::CommittedTx;
use kalima_core::ledger::{
    BridgeChain, BridgeState, DepositRecord, DepositStatus, Exchange, Ledger, LedgerOp, SignedWithdrawal,
    WithdrawalRecord, bridge_address, validate_bridge_name,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use super::klx::submit;
use super::model::TxReceipt;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/bridge/chains", get(chains))
        .route("/bridge/chains/{name}", put(configure))
        .route("/bridge/chains/{name}/resume", post(resume))
        .route("/bridge/deposits/{name}", get(deposits_by_tx))
        .route("/bridge/deposits/{name}/{nonce}", get(deposit))
        .route("/bridge/withdrawals", post(withdraw))
        .route("/bridge/withdrawals/{name}/{id}", get(withdrawal))
        .route("/bridge/status", get(status))
        .route("/bridge/exchanges", post(register_exchange))
        .route("/bridge/exchanges/{id}", get(exchange))
        .route("/bridge/exchanges/{id}/addresses", post(add_addresses))
        .route("/bridge/exchanges/{id}/addresses/{account}", get(exchange_address))
}

/// Registers an exchange (admin); at most 100.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewExchange {
    /// Exchange id (letters, digits, `-`, `_`, `.`; at most 64 bytes).
    pub id: String,
    /// Registered device that manages its addresses.
    pub device: String,
}

/// Native addresses to register to an exchange.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAddresses {
    /// 1 to 1,000 accounts (64 hex) per call; at most 1,000,000 per exchange.
    #[schema(min_items = 1, max_items = 1000)]
    pub accounts: Vec<String>,
}

/// Whether an account is registered to an exchange.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExchangeAddress {
    /// The account.
    pub account: String,
    /// The exchange it is registered to.
    pub exchange: String,
}

/// Registers an exchange, managed by one of its devices (admin).
#[utoipa::path(post, path = "/api/v1/bridge/exchanges", tag = "bridge", request_body = NewExchange,
    responses((status = 201, body = TxReceipt), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn register_exchange(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<NewExchange>,
) -> Result<(StatusCode, Json<TxReceipt>), ApiError> {
    auth.require_admin()?;
    let receipts = submit(&state, &LedgerOp::RegisterExchange { id: req.id, device: req.device }, &auth.0.id).await?;
    let r = receipts.first().ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    Ok((StatusCode::CREATED, Json(TxReceipt::from(r))))
}

/// An exchange: its device, address count, and KLX deposited to and withdrawn from its
/// addresses through the bridges.
#[utoipa::path(get, path = "/api/v1/bridge/exchanges/{id}", tag = "bridge",
    params(("id" = String, Path, description = "Exchange id")),
    responses((status = 200, body = Exchange), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn exchange(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Exchange>, ApiError> {
    Ledger::new(state.chain.memcache())
        .exchange(&id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no exchange named {id}")))
}

/// Registers native addresses to an exchange (its managing device, or the admin).
#[utoipa::path(post, path = "/api/v1/bridge/exchanges/{id}/addresses", tag = "bridge", request_body = NewAddresses,
    params(("id" = String, Path, description = "Exchange id")),
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn add_addresses(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<NewAddresses>,
) -> Result<Json<TxReceipt>, ApiError> {
    let op = LedgerOp::AddExchangeAddresses { exchange: id, accounts: req.accounts };
    let receipts = submit(&state, &op, &auth.0.id).await?;
    receipts.first().map(|r| Json(TxReceipt::from(r))).ok_or_else(|| ApiError::Internal("no receipt".into()))
}

/// Which exchange an account is registered to (404 when none, or another one).
#[utoipa::path(get, path = "/api/v1/bridge/exchanges/{id}/addresses/{account}", tag = "bridge",
    params(("id" = String, Path, description = "Exchange id"), ("account" = String, Path, description = "Account, 64 hex")),
    responses((status = 200, body = ExchangeAddress), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn exchange_address(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath((id, account)): ApiPath<(String, String)>,
) -> Result<Json<ExchangeAddress>, ApiError> {
    let account = account.to_ascii_lowercase();
    match Ledger::new(state.chain.memcache()).exchange_of(&account) {
        Some(ex) if ex == id => Ok(Json(ExchangeAddress { account, exchange: ex })),
        _ => Err(ApiError::NotFound(format!("account {account} is not registered to exchange {id}"))),
    }
}

/// A bridged chain: its configuration and totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainJson {
    /// Bridge name.
    pub name: String,
    /// Configuration (contract, token, relayers, threshold).
    pub config: BridgeChain,
    /// Totals (minted, burned, released) and cursors.
    pub totals: BridgeState,
    /// Locked in the contract at its last final block (base units), as this node's relayer
    /// last read it; absent when this node runs no relayer for the chain.
    pub locked: Option<String>,
}

/// A record and the transaction that holds it (fetch its proof at `GET /api/v1/tx/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Recorded<T: ToSchema> {
    /// The record.
    pub record: T,
    /// Id (hex) of the transaction that wrote this version of it.
    pub tx_id: String,
    /// Its block height.
    pub height: u64,
}

/// A deposit found in a source transaction, with its state on this chain.
#[derive(Debug, Serialize, ToSchema)]
pub struct DepositStatusJson {
    /// What the source chain holds, and whether it is final.
    pub source: FoundDeposit,
    /// `awaiting_finality`, `attesting`, `minted`.
    pub status: String,
    /// Matching attestations so far, and how many mint.
    pub attestations: usize,
    /// Threshold of the bridge.
    pub threshold: u32,
    /// The record on this chain, once a relayer attested it.
    pub record: Option<Recorded<DepositRecord>>,
}

/// Query of the deposit lookup.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DepositQuery {
    /// Source transaction hash (`0x` + 64 hex).
    pub tx_hash: String,
}

/// A withdrawal accepted: KLX burned, relayers signing.
#[derive(Debug, Serialize, ToSchema)]
pub struct WithdrawalAccepted {
    /// The withdrawal.
    pub withdrawal: WithdrawalRecord,
    /// Receipt of the instruction.
    pub receipt: TxReceipt,
}

/// The relayer run by this node.
#[derive(Debug, Serialize, ToSchema)]
pub struct RelayerJson {
    /// Its device id.
    pub device: String,
    /// Its Ethereum address.
    pub eth_address: String,
    /// Per chain.
    pub chains: Vec<ChainStatus>,
    /// The last conservation check across every chain.
    pub conservation: Conservation,
}

fn name_ok(name: &str) -> Result<(), ApiError> {
    validate_bridge_name(name).map_err(|e| ApiError::BadRequest("invalid_field", e.to_string()))
}

/// The latest version of a record: from memory, else from its history in the store.
async fn latest<T: DeserializeOwned + ToSchema>(
    state: &AppState,
    address: &str,
    key: &str,
) -> Result<Option<Recorded<T>>, ApiError> {
    let found: Option<CommittedTx> = match state.chain.memcache().get(address, key) {
        Some(c) => Some((*c).clone()),
        None => state
            .chain
            .store()
            .history(address, key, u64::MAX, 4)
            .await?
            .into_iter()
            .find(|c| !c.tx.content.body.is_empty()),
    };
    let Some(c) = found else { return Ok(None) };
    let record = serde_json::from_slice(&c.tx.content.body)
        .map_err(|e| ApiError::Internal(format!("record {address} {key} does not parse: {e}")))?;
    Ok(Some(Recorded { record, tx_id: hex::encode(c.id), height: c.height }))
}

/// Every bridged chain with its totals: minted, burned, released, and locked.
#[utoipa::path(get, path = "/api/v1/bridge/chains", tag = "bridge",
    responses((status = 200, body = Vec<ChainJson>)), security(("bearer" = [])))]
pub async fn chains(State(state): State<AppState>, _auth: Auth) -> Json<Vec<ChainJson>> {
    let ledger = Ledger::new(state.chain.memcache());
    let locked = state.relayer.as_ref().map(|r| r.conservation.read().locked_by_chain.clone()).unwrap_or_default();
    Json(
        ledger
            .bridges()
            .into_iter()
            .map(|(name, config)| ChainJson {
                totals: ledger.bridge_state(&name),
                locked: locked.get(&name).cloned(),
                name,
                config,
            })
            .collect(),
    )
}

/// Creates or replaces a bridge's configuration (admin). The threshold must be more than
/// half of the relayers; relayers must be registered devices with a public key; once funds
/// moved, the chain id, contract and token of a name cannot change.
#[utoipa::path(put, path = "/api/v1/bridge/chains/{name}", tag = "bridge", request_body = BridgeChain,
    params(("name" = String, Path, description = "Bridge name (a-z, 0-9, '-')")),
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn configure(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(name): ApiPath<String>,
    ApiJson(config): ApiJson<BridgeChain>,
) -> Result<Json<TxReceipt>, ApiError> {
    auth.require_admin()?;
    name_ok(&name)?;
    let receipts = submit(&state, &LedgerOp::ConfigureBridge { name, config }, &auth.0.id).await?;
    receipts.first().map(|r| Json(TxReceipt::from(r))).ok_or_else(|| ApiError::Internal("no receipt".into()))
}

/// Lifts a halt (admin), after the breach was understood.
#[utoipa::path(post, path = "/api/v1/bridge/chains/{name}/resume", tag = "bridge",
    params(("name" = String, Path, description = "Bridge name")),
    responses((status = 200, body = TxReceipt), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TxReceipt>, ApiError> {
    auth.require_admin()?;
    name_ok(&name)?;
    let receipts = submit(&state, &LedgerOp::ResumeBridge { name }, &auth.0.id).await?;
    receipts.first().map(|r| Json(TxReceipt::from(r))).ok_or_else(|| ApiError::Internal("no receipt".into()))
}

/// A deposit by its nonce.
#[utoipa::path(get, path = "/api/v1/bridge/deposits/{name}/{nonce}", tag = "bridge",
    params(("name" = String, Path, description = "Bridge name"), ("nonce" = u64, Path, description = "Deposit nonce")),
    responses((status = 200, body = Recorded<DepositRecord>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deposit(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath((name, nonce)): ApiPath<(String, u64)>,
) -> Result<Json<Recorded<DepositRecord>>, ApiError> {
    name_ok(&name)?;
    latest(&state, &bridge_address(&name, "deposits"), &nonce.to_string())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no relayer attested deposit {nonce} of bridge {name} yet")))
}

/// The deposits of a source transaction and where each stands: awaiting finality on the
/// source chain, being attested by relayers, or minted. Needs this node to reach the chain
/// (`[bridge] chains`); otherwise look up by nonce.
#[utoipa::path(get, path = "/api/v1/bridge/deposits/{name}", tag = "bridge",
    params(("name" = String, Path, description = "Bridge name"), DepositQuery),
    responses((status = 200, body = Vec<DepositStatusJson>), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deposits_by_tx(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<DepositQuery>,
) -> Result<Json<Vec<DepositStatusJson>>, ApiError> {
    name_ok(&name)?;
    let Some(settings) = state.config.bridge.chains.iter().find(|c| c.name == name) else {
        return Err(ApiError::NotFound(format!(
            "this node has no RPC endpoint for bridge {name} ([bridge] chains); look the deposit up by nonce"
        )));
    };
    let config = Ledger::new(state.chain.memcache())
        .bridge(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no bridge named {name} is configured")))?;
    let found = kalima_bridge_ethereum::deposits_in_tx(settings, &q.tx_hash).await.map_err(|e| match e {
        kalima_bridge_ethereum::Error::Config(m) => ApiError::BadRequest("invalid_field", m),
        other => ApiError::Unavailable(format!("{other:#}")),
    })?;
    let mut out = Vec::with_capacity(found.len());
    for f in found {
        let record: Option<Recorded<DepositRecord>> =
            latest(&state, &bridge_address(&name, "deposits"), &f.deposit.nonce.to_string()).await?;
        let attestations = record
            .as_ref()
            .map(|r| {
                r.record
                    .votes
                    .iter()
                    .filter(|(relayer, d)| config.relayer(relayer).is_some() && **d == f.deposit)
                    .count()
            })
            .unwrap_or(0);
        let status = match (&record, f.finalized) {
            (Some(r), _) if r.record.status == DepositStatus::Minted => "minted",
            (_, false) => "awaiting_finality",
            _ => "attesting",
        };
        out.push(DepositStatusJson {
            source: f,
            status: status.into(),
            attestations,
            threshold: config.threshold,
            record,
        });
    }
    Ok(Json(out))
}

/// Burns native KLX and asks the relayers to release it on a bridged chain. Signed by the
/// account's key (bytes in `openapi/ENCODING.md`); any registered device may carry it.
#[utoipa::path(post, path = "/api/v1/bridge/withdrawals", tag = "bridge", request_body = SignedWithdrawal,
    responses(
        (status = 201, description = "Burned; relayers sign the release", body = WithdrawalAccepted),
        (status = 400, body = ErrorBody), (status = 404, description = "No such bridge", body = ErrorBody),
        (status = 409, description = "Wrong nonce, or the bridge is halted", body = ErrorBody),
        (status = 422, description = "Insufficient funds, or over the per-withdrawal cap", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn withdraw(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(w): ApiJson<SignedWithdrawal>,
) -> Result<(StatusCode, Json<WithdrawalAccepted>), ApiError> {
    let name = w.chain.clone();
    let receipts = submit(&state, &LedgerOp::Withdraw(w), &auth.0.id).await?;
    let first = receipts.first().ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    // The withdrawal record is the last record the instruction wrote.
    let last = receipts.last().ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    let tx = state
        .chain
        .store()
        .tx_by_id(&last.id)
        .await?
        .ok_or_else(|| ApiError::Internal("the withdrawal record is not stored".into()))?;
    if tx.tx.content.address != bridge_address(&name, "withdrawals") {
        return Err(ApiError::Internal("the last record of a withdrawal is not the withdrawal".into()));
    }
    let withdrawal = serde_json::from_slice(&tx.tx.content.body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(WithdrawalAccepted { withdrawal, receipt: TxReceipt::from(first) })))
}

/// A withdrawal and where it stands (signing, ready, released with the release transaction).
#[utoipa::path(get, path = "/api/v1/bridge/withdrawals/{name}/{id}", tag = "bridge",
    params(("name" = String, Path, description = "Bridge name"), ("id" = String, Path, description = "Withdrawal id, 64 hex")),
    responses((status = 200, body = Recorded<WithdrawalRecord>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn withdrawal(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<Recorded<WithdrawalRecord>>, ApiError> {
    name_ok(&name)?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest("invalid_field", "a withdrawal id is 64 hex characters".into()));
    }
    latest(&state, &bridge_address(&name, "withdrawals"), &id.to_ascii_lowercase())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no withdrawal {id} on bridge {name}")))
}

/// The relayer this node runs: per-chain progress and the last conservation check.
#[utoipa::path(get, path = "/api/v1/bridge/status", tag = "bridge",
    responses((status = 200, body = RelayerJson), (status = 404, description = "This node runs no relayer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn status(State(state): State<AppState>, _auth: Auth) -> Result<Json<RelayerJson>, ApiError> {
    let r = state
        .relayer
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this node runs no relayer ([bridge] relayer_device)".into()))?;
    Ok(Json(RelayerJson {
        device: r.identity.device.clone(),
        eth_address: format!("{:#x}", r.identity.eth.address()),
        chains: r.status.read().values().cloned().collect(),
        conservation: r.conservation.read().clone(),
    }))
}
