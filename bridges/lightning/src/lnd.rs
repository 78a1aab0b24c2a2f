//! [`LndRest`]: the [`InvoiceBackend`] over LND's REST API (grpc-gateway), with the macaroon in
//! `Grpc-Metadata-macaroon` and TLS trusting LND's `tls.cert`.
//!
//! Endpoints used, as LND documents them:
//! - `POST /v1/invoices` (AddInvoice), `GET /v1/invoice/{r_hash_str}` (LookupInvoice, hex hash),
//!   `GET /v1/invoices` (ListInvoices, only to catch up from settle index 0);
//! - `GET /v2/invoices/subscribe/{r_hash}` (SubscribeSingleInvoice, base64url hash) and
//!   `GET /v1/invoices/subscribe?settle_index=N` (SubscribeInvoices), both newline-delimited JSON.
//!
//! LND replays nothing for `settle_index=0` ("backwards compatibility"), so following
//! settlements from 0 first lists the invoices already settled. Non-streaming calls have a
//! timeout; streams only have a connect timeout and TCP keepalive, because LND sends a stream's
//! response head with its first event, which may come hours later.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use futures::{StreamExt, TryStreamExt, stream};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};

use crate::backend::{InvoiceBackend, InvoiceStream};
use crate::config::LightningSection;
use crate::error::{Error, Result};
use crate::telemetry;
use crate::types::{Invoice, InvoiceState, NewInvoice, PaymentHash};
use crate::{ndjson, wire};

/// Header LND reads the hex macaroon from (grpc-gateway forwards `Grpc-Metadata-*` as metadata).
pub const MACAROON_HEADER: &str = "Grpc-Metadata-macaroon";

const ADD_INVOICE: &str = "POST /v1/invoices";
const LOOKUP_INVOICE: &str = "GET /v1/invoice/{r_hash_str}";
const LIST_INVOICES: &str = "GET /v1/invoices";
const SUBSCRIBE_SINGLE: &str = "GET /v2/invoices/subscribe/{r_hash}";
const SUBSCRIBE_INVOICES: &str = "GET /v1/invoices/subscribe";

/// Largest non-streaming answer read (a page of 1000 invoices stays well below).
const MAX_BODY_BYTES: usize = 32 << 20;
/// Invoices per page when listing.
const LIST_PAGE: u64 = 1000;
/// How often settlements are listed while following from 0 on a node that has settled nothing.
pub const RELIST_WHILE_NOTHING_SETTLED: Duration = Duration::from_secs(2);

/// An LND macaroon: the bearer credential sent with every call. Its `Debug` hides the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Macaroon(Vec<u8>);

impl Macaroon {
    /// A macaroon from its binary serialization.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(Error::Config("macaroon is empty".into()));
        }
        Ok(Macaroon(bytes))
    }

    /// A macaroon given as hex (as `lncli bakemacaroon` prints it).
    pub fn from_hex(hex_str: &str) -> Result<Self> {
        let bytes = hex::decode(hex_str.trim()).map_err(|e| Error::Config(format!("macaroon hex: {e}")))?;
        Self::from_bytes(bytes)
    }

    /// Reads a macaroon file as LND writes it (binary). A file holding hex text is read as hex:
    /// a binary macaroon starts with a version byte that is never a hex digit.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("macaroon file {}: {e}", path.display())))?;
        let text = bytes.trim_ascii();
        if !text.is_empty() && text.len() % 2 == 0 && text.iter().all(u8::is_ascii_hexdigit) {
            return Self::from_hex(&String::from_utf8_lossy(text));
        }
        Self::from_bytes(bytes).map_err(|e| Error::Config(format!("macaroon file {}: {e}", path.display())))
    }

    /// The value of the `Grpc-Metadata-macaroon` header: lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl std::fmt::Debug for Macaroon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Macaroon({} bytes)", self.0.len())
    }
}

/// A client of one LND node's REST API. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct LndRest {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl std::fmt::Debug for LndRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LndRest").field("base", &self.base).field("timeout", &self.timeout).finish()
    }
}

impl LndRest {
    /// A client of the LND REST API at `url` (`https://host:port`), trusting `tls_cert_pem`
    /// (LND's `tls.cert`). No call is made yet.
    pub fn new(url: &str, macaroon: &Macaroon, tls_cert_pem: &[u8], request_timeout: Duration) -> Result<Self> {
        let parsed = reqwest::Url::parse(url).map_err(|e| Error::Config(format!("lnd_url {url:?}: {e}")))?;
        if parsed.scheme() != "https" {
            return Err(Error::Config(format!("lnd_url {url:?}: must be https:// (LND's REST API is TLS only)")));
        }
        if request_timeout.is_zero() {
            return Err(Error::Config("request timeout must be more than 0".into()));
        }
        let mut value =
            HeaderValue::from_str(&macaroon.to_hex()).map_err(|e| Error::Config(format!("macaroon: {e}")))?;
        value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(MACAROON_HEADER, value);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::tls::client_config(tls_cert_pem)?)
            .https_only(true)
            .default_headers(headers)
            .connect_timeout(request_timeout)
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {}", crate::error::error_chain(&e))))?;
        telemetry::register();
        Ok(LndRest { http, base: url.trim_end_matches('/').to_string(), timeout: request_timeout })
    }

    /// A client from the `[lightning]` section; relative file names are read from `base_dir`.
    pub fn from_section(section: &LightningSection, base_dir: &Path) -> Result<Self> {
        let macaroon = match &section.macaroon_hex {
            Some(h) => Macaroon::from_hex(h)?,
            None if section.macaroon_file.is_empty() => {
                return Err(Error::Config("lightning.macaroon_file or lightning.macaroon_hex is required".into()));
            }
            None => Macaroon::read(&base_dir.join(&section.macaroon_file))?,
        };
        if section.tls_cert_file.is_empty() {
            return Err(Error::Config("lightning.tls_cert_file is required".into()));
        }
        let cert_path = base_dir.join(&section.tls_cert_file);
        let pem = std::fs::read(&cert_path)
            .map_err(|e| Error::Config(format!("tls_cert_file {}: {e}", cert_path.display())))?;
        Self::new(&section.lnd_url, &macaroon, &pem, section.request_timeout())
    }

    /// The base URL calls go to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a non-streaming request and reads its whole answer, within the timeout.
    async fn call(&self, endpoint: &'static str, req: reqwest::RequestBuilder) -> Result<(StatusCode, Vec<u8>)> {
        let exchange = async {
            let mut resp = req.send().await.map_err(|e| Error::transport(endpoint, &e))?;
            let status = resp.status();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| Error::transport(endpoint, &e))? {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Error::malformed(endpoint, "body", format!("larger than {MAX_BODY_BYTES} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout { endpoint, timeout_ms: self.timeout.as_millis() as u64 }),
        }
    }

    async fn add_invoice(&self, req: &NewInvoice) -> Result<Invoice> {
        req.validate()?;
        // LND's JSON takes 64-bit integers as strings.
        let body = serde_json::json!({
            "memo": req.memo,
            "value_msat": req.amount_msat.to_string(),
            "expiry": req.expiry_secs.to_string(),
        });
        let (status, bytes) =
            self.call(ADD_INVOICE, self.http.post(format!("{}/v1/invoices", self.base)).json(&body)).await?;
        if !status.is_success() {
            return Err(status_error(ADD_INVOICE, status, &bytes));
        }
        let added = wire::add_invoice_response(ADD_INVOICE, &wire::parse_json(ADD_INVOICE, &bytes)?)?;
        check_payment_request(&added.payment_request, &added.payment_hash, req.amount_msat)?;
        let invoice = self.lookup(&added.payment_hash).await?.ok_or_else(|| {
            Error::malformed(LOOKUP_INVOICE, "body", format!("invoice {} just added is unknown", added.payment_hash))
        })?;
        if invoice.payment_request != added.payment_request || invoice.add_index != added.add_index {
            return Err(Error::malformed(
                LOOKUP_INVOICE,
                "payment_request",
                format!("invoice {} differs from the one just added", added.payment_hash),
            ));
        }
        tracing::debug!(target: "bridge::lightning", payment_hash = %invoice.payment_hash, add_index = invoice.add_index, value_msat = invoice.value_msat, "Created invoice.");
        Ok(invoice)
    }

    async fn lookup(&self, hash: &PaymentHash) -> Result<Option<Invoice>> {
        let url = format!("{}/v1/invoice/{hash}", self.base);
        let (status, bytes) = self.call(LOOKUP_INVOICE, self.http.get(url)).await?;
        if !status.is_success() {
            let err = wire::error_body(&bytes);
            // grpc-gateway maps NotFound (5) to 404; LND before 0.15 answered Unknown (2) with
            // this message and HTTP 500.
            if status == StatusCode::NOT_FOUND || err.code == Some(5) || err.message == "unable to locate invoice" {
                return Ok(None);
            }
            return Err(status_error(LOOKUP_INVOICE, status, &bytes));
        }
        let invoice = wire::invoice(LOOKUP_INVOICE, "", &wire::parse_json(LOOKUP_INVOICE, &bytes)?)?;
        if invoice.payment_hash != *hash {
            return Err(Error::malformed(
                LOOKUP_INVOICE,
                "r_hash",
                format!("asked for {hash}, got {}", invoice.payment_hash),
            ));
        }
        Ok(Some(invoice))
    }

    /// Every settled invoice, by increasing settle index (ListInvoices, page by page).
    async fn list_settled(&self) -> Result<Vec<Invoice>> {
        let mut settled = Vec::new();
        let mut offset = 0u64;
        loop {
            let url = format!("{}/v1/invoices", self.base);
            let query = [("index_offset", offset.to_string()), ("num_max_invoices", LIST_PAGE.to_string())];
            let (status, bytes) = self.call(LIST_INVOICES, self.http.get(url).query(&query)).await?;
            if !status.is_success() {
                return Err(status_error(LIST_INVOICES, status, &bytes));
            }
            let (page, last) = wire::list_invoices_response(LIST_INVOICES, &wire::parse_json(LIST_INVOICES, &bytes)?)?;
            if page.is_empty() {
                break;
            }
            if last <= offset {
                return Err(Error::malformed(
                    LIST_INVOICES,
                    "last_index_offset",
                    format!("{last} does not move past index_offset {offset}"),
                ));
            }
            settled.extend(page.into_iter().filter(|i| i.state == InvoiceState::Settled && i.settle_index > 0));
            offset = last;
        }
        settled.sort_by_key(|i| i.settle_index);
        Ok(settled)
    }

    /// Opens a newline-delimited JSON stream lazily: the request goes out on the first poll.
    fn stream_invoices(&self, endpoint: &'static str, req: reqwest::RequestBuilder) -> InvoiceStream {
        let connect = async move {
            let resp = req.send().await.map_err(|e| Error::transport(endpoint, &e))?;
            let status = resp.status();
            if !status.is_success() {
                // The head may carry the error of the stream's first message (grpc-gateway).
                let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes()).await;
                let body = body.ok().and_then(|b| b.ok()).unwrap_or_default();
                return Err(status_error(endpoint, status, &body));
            }
            let lines = ndjson::lines(endpoint, resp.bytes_stream());
            Ok(lines.map(move |line| line.and_then(|l| wire::stream_line(endpoint, &l))))
        };
        end_after_error(stream::once(connect).try_flatten().inspect_err(telemetry::error).boxed())
    }

    /// Every invoice update LND sends on `SubscribeInvoices` (adds and settles, after the replay).
    fn subscribe_invoices(&self, settle_index: u64) -> InvoiceStream {
        let req = self
            .http
            .get(format!("{}/v1/invoices/subscribe", self.base))
            .query(&[("settle_index", settle_index.to_string())]);
        self.stream_invoices(SUBSCRIBE_INVOICES, req)
    }

    /// Catch-up from settle index 0, which LND does not replay: list what is settled and then
    /// subscribe from the highest settle index listed, which LND does replay from.
    ///
    /// When nothing is settled yet there is no index to replay from, so this subscribes from 0
    /// and lists again as soon as the stream shows it is registered (its first event): every
    /// settlement is then either in that list or on the stream. A settlement between the first
    /// list and the registration would only show with the next event on the node, so the list
    /// is also repeated every [`RELIST_WHILE_NOTHING_SETTLED`] until something is settled.
    fn settled_from_zero(&self) -> InvoiceStream {
        let this = self.clone();
        let start = async move {
            let listed = this.list_settled().await.inspect_err(telemetry::error)?;
            if let Some(highest) = listed.last().map(|i| i.settle_index) {
                return Ok(stream::iter(listed.into_iter().map(Ok)).chain(this.subscribe_invoices(highest)).boxed());
            }
            let mut live = this.subscribe_invoices(0);
            loop {
                tokio::select! {
                    first = live.next() => {
                        let first = match first {
                            None => return Ok(stream::empty().boxed()),
                            Some(first) => first?,
                        };
                        let listed = this.list_settled().await.inspect_err(telemetry::error)?;
                        let replay = stream::iter(listed.into_iter().map(Ok));
                        return Ok(replay.chain(stream::once(async { Ok(first) })).chain(live).boxed());
                    }
                    _ = tokio::time::sleep(RELIST_WHILE_NOTHING_SETTLED) => {
                        let listed = this.list_settled().await.inspect_err(telemetry::error)?;
                        if let Some(highest) = listed.last().map(|i| i.settle_index) {
                            let replay = stream::iter(listed.into_iter().map(Ok));
                            return Ok(replay.chain(this.subscribe_invoices(highest)).boxed());
                        }
                    }
                }
            }
        };
        // Errors are counted where they arise: in the listings above and in the inner streams.
        stream::once(start).try_flatten().boxed()
    }
}

/// The stream up to and including its first error, as [`InvoiceStream`] promises.
fn end_after_error(updates: InvoiceStream) -> InvoiceStream {
    updates
        .scan(false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            *failed |= matches!(out, Some(Err(_)));
            futures::future::ready(out)
        })
        .boxed()
}

/// Settled invoices with a settle index above `after`, each once, in increasing settle index.
fn settled_after(updates: InvoiceStream, after: u64) -> InvoiceStream {
    updates
        .scan(after, |last, item| {
            let keep = match item {
                Ok(inv) if inv.state == InvoiceState::Settled && inv.settle_index > *last => {
                    *last = inv.settle_index;
                    Some(Ok(inv))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(Some(keep))
        })
        .filter_map(futures::future::ready)
        .boxed()
}

/// Decodes the BOLT11 request LND returned and checks it pays `hash` for `amount_msat`.
fn check_payment_request(payment_request: &str, hash: &PaymentHash, amount_msat: u64) -> Result<()> {
    let bad = |reason: String| Error::malformed(ADD_INVOICE, "payment_request", reason);
    let invoice: lightning_invoice::Bolt11Invoice =
        payment_request.parse().map_err(|e| bad(format!("not a valid BOLT11 invoice: {e}")))?;
    let in_invoice: &[u8] = invoice.payment_hash().as_ref();
    if in_invoice != hash.as_bytes() {
        return Err(bad(format!("pays hash {}, not r_hash {hash}", hex::encode(in_invoice))));
    }
    if invoice.amount_milli_satoshis() != Some(amount_msat) {
        return Err(bad(format!("asks {:?} msat, not {amount_msat}", invoice.amount_milli_satoshis())));
    }
    Ok(())
}

/// The error for a non-2xx answer, with LND's message when the body is a grpc-gateway error.
fn status_error(endpoint: &'static str, status: StatusCode, body: &[u8]) -> Error {
    let err = wire::error_body(body);
    let message = if err.message.is_empty() { status.to_string() } else { err.message };
    // LND's macaroon checks fail with plain errors (gRPC Unknown, HTTP 500); grpc-gateway maps
    // Unauthenticated and PermissionDenied to 401 and 403.
    let lower = message.to_ascii_lowercase();
    let auth = status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || matches!(err.code, Some(7) | Some(16))
        || lower.contains("macaroon")
        || lower.starts_with("verification failed")
        || lower.contains("permission denied");
    if auth {
        Error::Unauthorized { endpoint, message }
    } else {
        Error::Lnd { endpoint, status: status.as_u16(), code: err.code, message }
    }
}

#[async_trait]
impl InvoiceBackend for LndRest {
    async fn create_invoice(&self, req: NewInvoice) -> Result<Invoice> {
        let result = self.add_invoice(&req).await;
        match &result {
            Ok(_) => metrics::counter!(telemetry::INVOICES_CREATED).increment(1),
            Err(e) => telemetry::error(e),
        }
        result
    }

    async fn lookup_invoice(&self, payment_hash: &PaymentHash) -> Result<Option<Invoice>> {
        self.lookup(payment_hash).await.inspect_err(telemetry::error)
    }

    async fn subscribe_invoice(&self, payment_hash: &PaymentHash) -> Result<InvoiceStream> {
        let hash = *payment_hash;
        // The REST path takes the hash as base64url (grpc-gateway decodes padded base64).
        let url = format!("{}/v2/invoices/subscribe/{}", self.base, URL_SAFE.encode(hash.as_bytes()));
        let updates = self.stream_invoices(SUBSCRIBE_SINGLE, self.http.get(url));
        let updates = updates
            .map(move |item| match item {
                Ok(inv) if inv.payment_hash != hash => {
                    let err = Error::malformed(
                        SUBSCRIBE_SINGLE,
                        "result.r_hash",
                        format!("subscribed to {hash}, got {}", inv.payment_hash),
                    );
                    telemetry::error(&err);
                    Err(err)
                }
                other => other,
            })
            .boxed();
        Ok(end_after_error(updates))
    }

    async fn subscribe_settled(&self, after_settle_index: u64) -> Result<InvoiceStream> {
        let updates = if after_settle_index == 0 {
            self.settled_from_zero()
        } else {
            self.subscribe_invoices(after_settle_index)
        };
        Ok(settled_after(updates, after_settle_index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(settle_index: u64, state: InvoiceState) -> Invoice {
        Invoice {
            payment_hash: PaymentHash([settle_index as u8; 32]),
            payment_request: String::new(),
            value_msat: 1000,
            memo: String::new(),
            state,
            add_index: settle_index,
            settle_index,
            amt_paid_msat: 0,
            creation_date: 0,
            expiry_secs: 0,
            settle_date: 0,
        }
    }

    #[tokio::test]
    async fn settled_after_keeps_new_settlements_once_and_in_order() {
        use InvoiceState::*;
        let updates = vec![
            Ok(inv(0, Open)),
            Ok(inv(3, Settled)),
            Ok(inv(5, Settled)),
            Ok(inv(5, Settled)),
            Ok(inv(4, Settled)),
            Ok(inv(0, Canceled)),
            Ok(inv(6, Settled)),
        ];
        let out: Vec<u64> =
            settled_after(stream::iter(updates).boxed(), 3).map(|r| r.unwrap().settle_index).collect().await;
        assert_eq!(out, [5, 6]);
    }

    #[tokio::test]
    async fn a_stream_ends_at_its_first_error() {
        let items = vec![
            Ok(inv(1, InvoiceState::Settled)),
            Err(Error::malformed("e", "line", "not JSON")),
            Ok(inv(2, InvoiceState::Settled)),
        ];
        let out: Vec<bool> = end_after_error(stream::iter(items).boxed()).map(|r| r.is_ok()).collect().await;
        assert_eq!(out, [true, false]);
    }

    #[test]
    fn status_errors_tell_auth_from_other_failures() {
        let e = status_error(
            ADD_INVOICE,
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"code":2,"message":"verification failed: signature mismatch after caveat verification","details":[]}"#,
        );
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        let e = status_error(
            ADD_INVOICE,
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"code":2,"message":"expected 1 macaroon, got 0","details":[]}"#,
        );
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        let e = status_error(
            ADD_INVOICE,
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"code":2,"message":"invoice expiry time too long","details":[]}"#,
        );
        assert_eq!(
            e.to_string(),
            "LND POST /v1/invoices answered HTTP 500 (gRPC code 2): invoice expiry time too long"
        );
        let e = status_error(ADD_INVOICE, StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.to_string(), "LND POST /v1/invoices answered HTTP 502: 502 Bad Gateway");
    }

    #[test]
    fn macaroon_debug_hides_the_secret_and_hex_files_are_read() {
        let m = Macaroon::from_bytes(vec![2, 1, 3]).unwrap();
        assert_eq!(format!("{m:?}"), "Macaroon(3 bytes)");
        assert_eq!(m.to_hex(), "020103");
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin.macaroon");
        std::fs::write(&bin, [2u8, 0xff, 0x10]).unwrap();
        assert_eq!(Macaroon::read(&bin).unwrap().to_hex(), "02ff10");
        let text = dir.path().join("hex.macaroon");
        std::fs::write(&text, "02ff10\n").unwrap();
        assert_eq!(Macaroon::read(&text).unwrap().to_hex(), "02ff10");
        let err = Macaroon::read(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("macaroon file"), "{err}");
        assert!(Macaroon::from_hex("zz").is_err());
        assert!(Macaroon::from_bytes(Vec::new()).is_err());
    }

    #[test]
    fn only_https_urls_are_accepted() {
        let m = Macaroon::from_bytes(vec![2]).unwrap();
        let err = LndRest::new("http://127.0.0.1:8080", &m, b"", Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("must be https://"), "{err}");
    }
}
