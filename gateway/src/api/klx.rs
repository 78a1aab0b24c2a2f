//! `/api/v1/klx`: native KLX accounts, supply and holder-signed transfers.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use kalima_core::Receipt;
use kalima_core::chain::Guard;
use kalima_core::ledger::{AccountKey, KLX_SUPPLY_CAP, Ledger, LedgerOp, SignedTransfer};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Auth};
use super::model::TxReceipt;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/klx/accounts/{account}", get(account))
        .route("/klx/supply", get(supply))
        .route("/klx/transfers", post(transfer))
}

/// A native account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountJson {
    /// The account (Ed25519 public key, 64 hex).
    pub account: String,
    /// Balance in base units (18 decimals), as a decimal string.
    pub balance: String,
    /// Instructions it signed; the next must carry `nonce + 1`.
    pub nonce: u64,
    /// The chain name its signatures are bound to (see `openapi/ENCODING.md`).
    pub chain: String,
}

/// Native supply, in base units.
#[derive(Debug, Serialize, ToSchema)]
pub struct SupplyJson {
    /// Minted by bridges for deposits.
    pub minted: String,
    /// Burned by withdrawals.
    pub burned: String,
    /// In circulation (minted - burned).
    pub circulating: String,
    /// The supply cap (480,000,000,000 KLX).
    pub cap: String,
}

/// Submits one ledger instruction and waits for its commit; the receipts cover the
/// instruction first, then the records it changed.
pub(crate) async fn submit(state: &AppState, op: &LedgerOp, device: &str) -> Result<Vec<Receipt>, ApiError> {
    let instr = op.instruction(device, String::new());
    Ok(state.chain.submit(vec![instr], Some(Guard::Ledger)).await?)
}

/// One account's balance and nonce.
#[utoipa::path(get, path = "/api/v1/klx/accounts/{account}", tag = "klx",
    params(("account" = String, Path, description = "Ed25519 public key, 64 hex")),
    responses((status = 200, body = AccountJson), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn account(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(account): ApiPath<String>,
) -> Result<Json<AccountJson>, ApiError> {
    let key = AccountKey::from_hex(&account).map_err(kalima_core::Rejection::from)?;
    let a = Ledger::new(state.chain.memcache()).account(&key);
    Ok(Json(AccountJson {
        account: key.to_hex(),
        balance: a.balance.to_string(),
        nonce: a.nonce,
        chain: state.chain.config().chain.clone(),
    }))
}

/// The native supply.
#[utoipa::path(get, path = "/api/v1/klx/supply", tag = "klx",
    responses((status = 200, body = SupplyJson)), security(("bearer" = [])))]
pub async fn supply(State(state): State<AppState>, _auth: Auth) -> Json<SupplyJson> {
    let s = Ledger::new(state.chain.memcache()).supply();
    Json(SupplyJson {
        minted: s.minted.to_string(),
        burned: s.burned.to_string(),
        circulating: s.circulating().to_string(),
        cap: KLX_SUPPLY_CAP.to_string(),
    })
}

/// Transfers KLX between accounts. The transfer is signed by the paying account's key over
/// the bytes described in `openapi/ENCODING.md` (KLX instructions); any registered device
/// may carry it. Answered after the commit.
#[utoipa::path(post, path = "/api/v1/klx/transfers", tag = "klx", request_body = SignedTransfer,
    responses(
        (status = 200, description = "Committed", body = TxReceipt),
        (status = 400, description = "Malformed, or the signature does not verify", body = ErrorBody),
        (status = 409, description = "Not the account's next nonce", body = ErrorBody),
        (status = 422, description = "Insufficient funds", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn transfer(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(t): ApiJson<SignedTransfer>,
) -> Result<Json<TxReceipt>, ApiError> {
    let receipts = submit(&state, &LedgerOp::Transfer(t), &auth.0.id).await?;
    receipts.first().map(|r| Json(TxReceipt::from(r))).ok_or_else(|| ApiError::Internal("no receipt".into()))
}
