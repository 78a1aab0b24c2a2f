//! A stand-in for LND's REST API, for tests (feature `test-utils`): no LND binary runs here, so
//! this server follows LND's documented REST API and its observable behaviour closely enough to
//! test [`crate::LndRest`] and the [`crate::SettlementWatcher`] against it.
//!
//! What it follows:
//! - HTTPS on `127.0.0.1:<free port>` with a certificate shaped like LND's own `tls.cert`
//!   (self-signed ECDSA P-256, `CA:TRUE`, names `localhost`, `127.0.0.1`, `::1`);
//! - the macaroon in `Grpc-Metadata-macaroon` (hex), refused as LND refuses it: a gRPC
//!   Unknown error (HTTP 500) `expected 1 macaroon, got 0` or `verification failed: ...`;
//! - `POST /v1/invoices`, `GET /v1/invoice/{r_hash_str}`, `GET /v1/invoices`,
//!   `GET /v1/invoices/subscribe` (replay by `add_index`/`settle_index`, none for 0, then
//!   adds and settles) and `GET /v2/invoices/subscribe/{r_hash}` (current state, then changes,
//!   closed after a final state), in grpc-gateway's JSON (64-bit integers as strings, bytes as
//!   base64, newline-delimited `{"result": ...}` stream lines, `{"code","message","details"}`
//!   errors, 404 for an unknown invoice; a stream's response head goes out with its first
//!   line, as grpc-gateway writes it);
//! - real BOLT11 invoices from `lightning-invoice`, signed by a secp256k1 node key: SHA-256 of a
//!   random preimage as payment hash, amount, memo as description, expiry, payment secret,
//!   `min_final_cltv_expiry_delta` 80, on a configurable network (regtest by default);
//! - add and settle indexes that count from 1, and expiry: an OPEN invoice past its expiry
//!   becomes CANCELED, as LND's expiry watcher does.
//!
//! Test controls: [`LndStandin::settle`], [`LndStandin::cancel`], [`LndStandin::advance_time`],
//! [`LndStandin::drop_streams`] and [`LndStandin::end_streams`], [`LndStandin::inject`] (malformed
//! answers), and [`LndStandin::stop`] / [`LndStandin::start_again`] with the same invoices,
//! certificate, macaroon, node key and port, as a restarted LND keeps its database.
//!
//! Not followed: payments themselves (settling is a test control), hold invoices, AMP, keysend,
//! route hints, the WebSocket proxy, macaroon caveats and permissions (one macaroon, all allowed).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use bitcoin::hashes::{Hash as _, sha256};
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey, SignOnly};
use futures::StreamExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use lightning_invoice::{Currency, InvoiceBuilder, PaymentSecret};
use parking_lot::Mutex;
use rand::RngCore as _;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};
use crate::lnd::{LndRest, MACAROON_HEADER, Macaroon};
use crate::types::{Invoice, InvoiceState, PaymentHash};

/// `min_final_cltv_expiry_delta` of the invoices, LND's default for Bitcoin.
const CLTV_EXPIRY_DELTA: u64 = 80;
/// LND's default expiry when a request gives 0.
const DEFAULT_EXPIRY_SECS: u64 = 86_400;
/// LND's `MaxMemoSize`.
const MAX_MEMO_SIZE: usize = 1024;

/// An endpoint of the stand-in, to aim a [`Fault`] at or to count its open streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/invoices`.
    AddInvoice,
    /// `GET /v1/invoice/{r_hash_str}`.
    LookupInvoice,
    /// `GET /v1/invoices`.
    ListInvoices,
    /// `GET /v1/invoices/subscribe`.
    SubscribeInvoices,
    /// `GET /v2/invoices/subscribe/{r_hash}`.
    SubscribeSingleInvoice,
}

/// A malformed answer, given once by the next call of a route (see [`LndStandin::inject`]).
/// On a streaming route it is the stream's first line, and the stream then ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A body (or line) that is not JSON.
    NotJson,
    /// `r_hash` that is not base64.
    BadBase64Hash,
    /// `r_hash` of 16 bytes.
    ShortHash,
    /// `add_index` (and `settle_index`) `"12abc"`.
    NonNumericIndex,
    /// HTTP 500 with a grpc-gateway error (streams: before the first line).
    Status500,
    /// Half of the body (streams: half a line, then the end of the stream).
    Truncated,
    /// Streams: a `{"error": ...}` line. Other routes: like `Status500`.
    StreamError,
    /// No answer at all: the request hangs until the client gives up.
    Hang,
}

/// Settings of a stand-in.
#[derive(Debug, Clone)]
pub struct StandinOptions {
    /// Network of the invoices (the BOLT11 prefix): regtest (`lnbcrt`) by default.
    pub currency: Currency,
    /// The macaroon it accepts; random when `None`.
    pub macaroon: Option<Vec<u8>>,
}

impl Default for StandinOptions {
    fn default() -> Self {
        StandinOptions { currency: Currency::Regtest, macaroon: None }
    }
}

/// One invoice as the stand-in stores it.
#[derive(Debug, Clone)]
struct Stored {
    hash: [u8; 32],
    preimage: [u8; 32],
    payment_addr: [u8; 32],
    payment_request: String,
    value_msat: u64,
    memo: String,
    state: InvoiceState,
    add_index: u64,
    settle_index: u64,
    amt_paid_msat: u64,
    /// Creation time since the Unix epoch, on the stand-in's clock; the BOLT11 timestamp is its
    /// whole seconds.
    created: Duration,
    expiry_secs: u64,
    settle_date: u64,
}

impl Stored {
    fn to_invoice(&self) -> Invoice {
        Invoice {
            payment_hash: PaymentHash(self.hash),
            payment_request: self.payment_request.clone(),
            value_msat: self.value_msat,
            memo: self.memo.clone(),
            state: self.state,
            add_index: self.add_index,
            settle_index: self.settle_index,
            amt_paid_msat: self.amt_paid_msat,
            creation_date: self.created.as_secs(),
            expiry_secs: self.expiry_secs,
            settle_date: self.settle_date,
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(self.created.as_secs()).saturating_add(Duration::from_secs(self.expiry_secs))
    }

    /// The invoice in LND's JSON: proto field names, every field present.
    fn to_json(&self) -> Value {
        json!({
            "memo": self.memo,
            "r_preimage": STANDARD.encode(self.preimage),
            "r_hash": STANDARD.encode(self.hash),
            "value": (self.value_msat / 1000).to_string(),
            "value_msat": self.value_msat.to_string(),
            "settled": self.state == InvoiceState::Settled,
            "creation_date": self.created.as_secs().to_string(),
            "settle_date": self.settle_date.to_string(),
            "payment_request": self.payment_request,
            "description_hash": "",
            "expiry": self.expiry_secs.to_string(),
            "fallback_addr": "",
            "cltv_expiry": CLTV_EXPIRY_DELTA.to_string(),
            "route_hints": [],
            "private": false,
            "add_index": self.add_index.to_string(),
            "settle_index": self.settle_index.to_string(),
            "amt_paid": self.amt_paid_msat.to_string(),
            "amt_paid_sat": (self.amt_paid_msat / 1000).to_string(),
            "amt_paid_msat": self.amt_paid_msat.to_string(),
            "state": self.state.lnd_name(),
            "htlcs": [],
            "features": {
                "8": {"name": "tlv-onion", "is_required": true, "is_known": true},
                "14": {"name": "payment-addr", "is_required": true, "is_known": true},
                "17": {"name": "multi-path-payments", "is_required": false, "is_known": true}
            },
            "is_keysend": false,
            "payment_addr": STANDARD.encode(self.payment_addr),
            "is_amp": false,
            "amp_invoice_state": {}
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Added,
    Settled,
    Changed,
}

#[derive(Debug, Clone)]
struct Event {
    kind: EventKind,
    invoice: Stored,
}

#[derive(Default)]
struct Book {
    /// By add index - 1.
    invoices: Vec<Stored>,
    by_hash: HashMap<[u8; 32], usize>,
    settle_count: u64,
    clock_offset: Duration,
}

/// A request to cut every open stream: `abort` cuts the connection, otherwise the stream ends.
#[derive(Debug, Clone, Copy, Default)]
struct Cut {
    generation: u64,
    abort: bool,
}

struct Shared {
    state: Mutex<Book>,
    events: broadcast::Sender<Event>,
    cut: watch::Sender<Cut>,
    open_streams: watch::Sender<HashMap<Route, usize>>,
    faults: watch::Sender<HashMap<Route, VecDeque<Fault>>>,
    expiry_wake: Notify,
    macaroon: Vec<u8>,
    cert_pem: String,
    tls: Arc<rustls::ServerConfig>,
    secp: Secp256k1<SignOnly>,
    node_key: SecretKey,
    currency: Currency,
}

/// A running LND REST stand-in. Stopped when dropped.
pub struct LndStandin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    expiry: JoinHandle<()>,
}

impl std::fmt::Debug for LndStandin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LndStandin").field("addr", &self.addr).field("running", &self.server.is_some()).finish()
    }
}

impl Drop for LndStandin {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(true);
            task.abort();
        }
        self.expiry.abort();
    }
}

impl LndStandin {
    /// Starts a stand-in on regtest with a random macaroon.
    pub async fn start() -> Result<LndStandin> {
        Self::start_with(StandinOptions::default()).await
    }

    /// Starts a stand-in with these options on `127.0.0.1` and a free port.
    pub async fn start_with(options: StandinOptions) -> Result<LndStandin> {
        if options.macaroon.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::Config("LND stand-in: the macaroon must not be empty".into()));
        }
        let mut rng = rand::thread_rng();
        let macaroon = options.macaroon.unwrap_or_else(|| {
            // Shaped like a v2 macaroon: a version byte 2, then opaque bytes.
            let mut m = vec![2u8; 64];
            rng.fill_bytes(&mut m[1..]);
            m
        });
        let node_key = loop {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            if let Ok(key) = SecretKey::from_slice(&bytes) {
                break key;
            }
        };
        let (cert_pem, tls) = lnd_like_tls()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(Book::default()),
            events: broadcast::channel(4096).0,
            cut: watch::channel(Cut::default()).0,
            open_streams: watch::channel(HashMap::new()).0,
            faults: watch::channel(HashMap::new()).0,
            expiry_wake: Notify::new(),
            macaroon,
            cert_pem,
            tls,
            secp: Secp256k1::signing_only(),
            node_key,
            currency: options.currency,
        });
        let expiry = tokio::spawn(expiry_loop(shared.clone()));
        let mut standin = LndStandin { shared, addr: SocketAddr::from(([127, 0, 0, 1], 0)), server: None, expiry };
        standin.start_again().await?;
        Ok(standin)
    }

    /// Serves again after [`LndStandin::stop`], on the same port, with the same state.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let io = |e: std::io::Error| Error::Config(format!("LND stand-in: bind {}: {e}", self.addr));
        let socket = TcpSocket::new_v4().map_err(io)?;
        // The port is taken again at once after a stop, as LND restarting on its restlisten.
        socket.set_reuseaddr(true).map_err(io)?;
        socket.bind(self.addr).map_err(io)?;
        let listener = socket.listen(128).map_err(io)?;
        self.addr = listener.local_addr().map_err(io)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, self.shared.clone(), stop_rx));
        self.server = Some((stop, task));
        Ok(())
    }

    /// Stops serving: the listener closes and every connection is cut. The state is kept.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Stops and serves again with the same state, as LND restarting on its database.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.start_again().await
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its certificate, as LND's `tls.cert` (PEM).
    pub fn tls_cert_pem(&self) -> &str {
        &self.shared.cert_pem
    }

    /// The macaroon it accepts.
    pub fn macaroon(&self) -> Macaroon {
        Macaroon::from_bytes(self.shared.macaroon.clone()).unwrap_or_else(|_| unreachable!("never empty"))
    }

    /// The node's public key (33 bytes, hex), which signs every invoice.
    pub fn node_public_key(&self) -> String {
        hex::encode(PublicKey::from_secret_key(&self.shared.secp, &self.shared.node_key).serialize())
    }

    /// The network of its invoices.
    pub fn currency(&self) -> Currency {
        self.shared.currency.clone()
    }

    /// Writes `tls.cert` and `invoice.macaroon` (binary) into `dir`, as LND lays them out.
    pub fn write_lnd_files(&self, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join("tls.cert");
        let macaroon = dir.join("invoice.macaroon");
        std::fs::write(&cert, &self.shared.cert_pem)?;
        std::fs::write(&macaroon, &self.shared.macaroon)?;
        Ok((cert, macaroon))
    }

    /// An [`LndRest`] client of this stand-in, trusting its certificate, with its macaroon.
    pub fn client(&self) -> Result<LndRest> {
        LndRest::new(&self.url(), &self.macaroon(), self.shared.cert_pem.as_bytes(), Duration::from_secs(10))
    }

    /// The invoice as the stand-in holds it.
    pub fn invoice(&self, hash: &PaymentHash) -> Option<Invoice> {
        let state = self.shared.state.lock();
        state.by_hash.get(&hash.0).map(|&i| state.invoices[i].to_invoice())
    }

    /// The preimage of an invoice (what a payer learns on paying).
    pub fn preimage(&self, hash: &PaymentHash) -> Option<[u8; 32]> {
        let state = self.shared.state.lock();
        state.by_hash.get(&hash.0).map(|&i| state.invoices[i].preimage)
    }

    /// Pays an OPEN invoice in full: SETTLED, `amt_paid_msat` = value, the next settle index,
    /// and every subscriber told.
    pub fn settle(&self, hash: &PaymentHash) -> Result<Invoice> {
        self.shared.update(hash, |inv, state, now| {
            if inv.state != InvoiceState::Open && inv.state != InvoiceState::Accepted {
                return Err(Error::InvalidArgument(format!("invoice {hash} is {}, it cannot be settled", inv.state)));
            }
            state.settle_count += 1;
            inv.state = InvoiceState::Settled;
            inv.settle_index = state.settle_count;
            inv.amt_paid_msat = inv.value_msat;
            inv.settle_date = now.as_secs();
            Ok(EventKind::Settled)
        })
    }

    /// Cancels an unpaid invoice (`CancelInvoice`), telling its subscribers.
    pub fn cancel(&self, hash: &PaymentHash) -> Result<Invoice> {
        self.shared.update(hash, |inv, _, _| {
            if inv.state == InvoiceState::Settled {
                return Err(Error::InvalidArgument(format!("invoice {hash} is already settled")));
            }
            inv.state = InvoiceState::Canceled;
            Ok(EventKind::Changed)
        })
    }

    /// Moves the stand-in's clock forward; OPEN invoices now past their expiry are canceled
    /// before this returns. New invoices carry the moved clock in their timestamp.
    pub fn advance_time(&self, by: Duration) {
        self.shared.state.lock().clock_offset += by;
        self.shared.expire_due();
        self.shared.expiry_wake.notify_one();
    }

    /// Cuts every open stream's connection, as a network failure or an LND crash would.
    pub fn drop_streams(&self) {
        self.shared.cut.send_modify(|c| {
            c.generation += 1;
            c.abort = true;
        });
    }

    /// Ends every open stream cleanly (the response body ends).
    pub fn end_streams(&self) {
        self.shared.cut.send_modify(|c| {
            c.generation += 1;
            c.abort = false;
        });
    }

    /// Makes the next call of `route` answer with `fault`; several faults queue up in order.
    pub fn inject(&self, route: Route, fault: Fault) {
        self.shared.faults.send_modify(|f| f.entry(route).or_default().push_back(fault));
    }

    /// Waits until every fault injected for `route` has been given.
    pub async fn wait_for_faults_given(&self, route: Route) {
        let mut rx = self.shared.faults.subscribe();
        let _ = rx.wait_for(|f| f.get(&route).is_none_or(VecDeque::is_empty)).await;
    }

    /// Streams of `route` open right now.
    pub fn open_streams(&self, route: Route) -> usize {
        self.shared.open_streams.borrow().get(&route).copied().unwrap_or(0)
    }

    /// Waits until at least `n` streams of `route` are open (subscribers registered).
    pub async fn wait_for_streams(&self, route: Route, n: usize) {
        let mut rx = self.shared.open_streams.subscribe();
        let _ = rx.wait_for(|m| m.get(&route).copied().unwrap_or(0) >= n).await;
    }
}

impl Shared {
    fn now(&self, state: &Book) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + state.clock_offset
    }

    fn take_fault(&self, route: Route) -> Option<Fault> {
        let mut taken = None;
        self.faults.send_if_modified(|f| {
            taken = f.get_mut(&route).and_then(VecDeque::pop_front);
            taken.is_some()
        });
        taken
    }

    fn update(
        &self,
        hash: &PaymentHash,
        change: impl FnOnce(&mut Stored, &mut Book, Duration) -> Result<EventKind>,
    ) -> Result<Invoice> {
        let mut state = self.state.lock();
        let now = self.now(&state);
        let Some(&i) = state.by_hash.get(&hash.0) else {
            return Err(Error::InvalidArgument(format!("no invoice {hash}")));
        };
        let mut inv = state.invoices[i].clone();
        let kind = change(&mut inv, &mut state, now)?;
        state.invoices[i] = inv.clone();
        let _ = self.events.send(Event { kind, invoice: inv.clone() });
        Ok(inv.to_invoice())
    }

    /// Cancels OPEN invoices past their expiry; returns the time until the next expiry.
    fn expire_due(&self) -> Option<Duration> {
        let mut state = self.state.lock();
        let now = self.now(&state);
        let mut next: Option<Duration> = None;
        for i in 0..state.invoices.len() {
            if state.invoices[i].state != InvoiceState::Open {
                continue;
            }
            let deadline = state.invoices[i].deadline();
            if deadline <= now {
                state.invoices[i].state = InvoiceState::Canceled;
                let _ = self.events.send(Event { kind: EventKind::Changed, invoice: state.invoices[i].clone() });
            } else {
                let left = deadline - now;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        next
    }

    fn add_invoice(&self, memo: String, value_msat: u64, expiry_secs: u64) -> std::result::Result<Stored, String> {
        let mut rng = rand::thread_rng();
        let mut preimage = [0u8; 32];
        let mut payment_addr = [0u8; 32];
        rng.fill_bytes(&mut preimage);
        rng.fill_bytes(&mut payment_addr);
        let hash = sha256::Hash::hash(&preimage);
        let mut state = self.state.lock();
        let now = self.now(&state);
        let mut builder = InvoiceBuilder::new(self.currency.clone())
            .description(memo.clone())
            .payment_hash(hash)
            .payment_secret(PaymentSecret(payment_addr))
            .duration_since_epoch(Duration::from_secs(now.as_secs()))
            .min_final_cltv_expiry_delta(CLTV_EXPIRY_DELTA)
            .expiry_time(Duration::from_secs(expiry_secs))
            .basic_mpp();
        if value_msat > 0 {
            builder = builder.amount_milli_satoshis(value_msat);
        }
        let bolt11 = builder
            .build_signed(|msg| self.secp.sign_ecdsa_recoverable(msg, &self.node_key))
            .map_err(|e| format!("unable to create invoice: {e}"))?;
        let stored = Stored {
            hash: hash.to_byte_array(),
            preimage,
            payment_addr,
            payment_request: bolt11.to_string(),
            value_msat,
            memo,
            state: InvoiceState::Open,
            add_index: state.invoices.len() as u64 + 1,
            settle_index: 0,
            amt_paid_msat: 0,
            created: now,
            expiry_secs,
            settle_date: 0,
        };
        let position = state.invoices.len();
        state.by_hash.insert(stored.hash, position);
        state.invoices.push(stored.clone());
        let _ = self.events.send(Event { kind: EventKind::Added, invoice: stored.clone() });
        drop(state);
        self.expiry_wake.notify_one();
        Ok(stored)
    }

    fn stream_opened(&self, route: Route) {
        self.open_streams.send_modify(|m| *m.entry(route).or_default() += 1);
    }

    fn stream_closed(&self, route: Route) {
        self.open_streams.send_modify(|m| {
            if let Some(n) = m.get_mut(&route) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

async fn expiry_loop(shared: Arc<Shared>) {
    loop {
        let next = shared.expire_due();
        let woken = shared.expiry_wake.notified();
        match next {
            Some(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = woken => {}
                }
            }
            None => woken.await,
        }
    }
}

/// A certificate made as LND's `cert.GenCertPair` makes `tls.cert`, and the server config.
fn lnd_like_tls() -> Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let tls_err = |e: &dyn std::fmt::Display| Error::Config(format!("LND stand-in TLS: {e}"));
    let names = ["localhost", "127.0.0.1", "::1", "unix", "unixpacket", "bufconn"].map(String::from).to_vec();
    let mut params = CertificateParams::new(names).map_err(|e| tls_err(&e))?;
    params.distinguished_name.push(DnType::OrganizationName, "lnd autogenerated cert");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let key = KeyPair::generate().map_err(|e| tls_err(&e))?;
    let cert = params.self_signed(&key).map_err(|e| tls_err(&e))?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| tls_err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((cert.pem(), Arc::new(config)))
}

/// Accepts TLS connections until stopped, then cuts every connection and closes the listener.
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    let app = router(shared);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/invoices", post(add_invoice).get(list_invoices))
        .route("/v1/invoice/{r_hash_str}", get(lookup_invoice))
        .route("/v1/invoices/subscribe", get(subscribe_invoices))
        .route("/v2/invoices/subscribe/{r_hash}", get(subscribe_single_invoice))
        .fallback(|| async { gateway_error(StatusCode::NOT_FOUND, 5, "Not Found", false) })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), check_macaroon))
        .with_state(shared)
}

/// A grpc-gateway error answer; on a stream, the error is wrapped as a stream line would be.
fn gateway_error(status: StatusCode, code: i64, message: &str, stream: bool) -> Response {
    let status_json = json!({"code": code, "message": message, "details": []});
    let body = if stream { json!({"error": status_json}) } else { status_json };
    json_response(status, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// LND's macaroon check: exactly one, hex, and the one it baked.
async fn check_macaroon(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let stream = req.uri().path().contains("/subscribe");
    let values: Vec<&HeaderValue> = req.headers().get_all(MACAROON_HEADER).iter().collect();
    if values.len() != 1 {
        let msg = format!("expected 1 macaroon, got {}", values.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, stream);
    }
    let Some(bytes) = values[0].to_str().ok().and_then(|v| hex::decode(v).ok()) else {
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "encoding/hex: invalid byte", stream);
    };
    if bytes != shared.macaroon {
        return gateway_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            2,
            "verification failed: signature mismatch after caveat verification",
            stream,
        );
    }
    next.run(req).await
}

/// A protojson 64-bit integer of a request: string or number; absent is 0.
fn request_u64(body: &Value, field: &str) -> std::result::Result<u64, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("invalid value for int64 field {field}: {s:?}")),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("invalid value for int64 field {field}: {n}")),
        Some(other) => Err(format!("invalid value for int64 field {field}: {other}")),
    }
}

/// The JSON of an invoice answer, with a fault applied to it.
fn corrupt(mut v: Value, fault: Fault, hash_field: &str) -> String {
    match fault {
        Fault::NotJson => return "this is not JSON".to_string(),
        Fault::BadBase64Hash => v[hash_field] = json!("!!not-base64!!"),
        Fault::ShortHash => v[hash_field] = json!(STANDARD.encode([7u8; 16])),
        Fault::NonNumericIndex => {
            v["add_index"] = json!("12abc");
            if v.get("settle_index").is_some() {
                v["settle_index"] = json!("12abc");
            }
        }
        Fault::Truncated => {
            let s = v.to_string();
            return s[..s.len() / 2].to_string();
        }
        Fault::Status500 | Fault::StreamError | Fault::Hang => {}
    }
    v.to_string()
}

/// Never answers (the connection stays open until the client drops it).
async fn hang() -> Response {
    std::future::pending().await
}

fn fault_status(fault: Fault, stream: bool) -> Option<Response> {
    match fault {
        Fault::Status500 => Some(gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "injected failure", stream)),
        Fault::StreamError if !stream => {
            Some(gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "injected failure", false))
        }
        _ => None,
    }
}

async fn add_invoice(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let fault = shared.take_fault(Route::AddInvoice);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return gateway_error(StatusCode::BAD_REQUEST, 3, "unexpected token in request body", false),
    };
    let memo = match body.get("memo") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            let msg = format!("invalid value for string field memo: {other}");
            return gateway_error(StatusCode::BAD_REQUEST, 3, &msg, false);
        }
    };
    let numbers = (request_u64(&body, "value"), request_u64(&body, "value_msat"), request_u64(&body, "expiry"));
    let (value, value_msat, expiry) = match numbers {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return gateway_error(StatusCode::BAD_REQUEST, 3, &e, false);
        }
    };
    if value != 0 && value_msat != 0 {
        let msg = "value and value_msat are mutually exclusive";
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, msg, false);
    }
    if memo.len() > MAX_MEMO_SIZE {
        let msg = format!("memo too large: {} bytes (maxsize={MAX_MEMO_SIZE})", memo.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false);
    }
    let value_msat = if value != 0 { value.saturating_mul(1000) } else { value_msat };
    let expiry = if expiry == 0 { DEFAULT_EXPIRY_SECS } else { expiry };
    let stored = match shared.add_invoice(memo, value_msat, expiry) {
        Ok(s) => s,
        Err(msg) => return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false),
    };
    let answer = json!({
        "r_hash": STANDARD.encode(stored.hash),
        "payment_request": stored.payment_request,
        "add_index": stored.add_index.to_string(),
        "payment_addr": STANDARD.encode(stored.payment_addr),
    });
    let text = match fault {
        Some(f) => corrupt(answer, f, "r_hash"),
        None => answer.to_string(),
    };
    json_response(StatusCode::OK, text)
}

async fn lookup_invoice(State(shared): State<Arc<Shared>>, UrlPath(r_hash_str): UrlPath<String>) -> Response {
    let fault = shared.take_fault(Route::LookupInvoice);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let hash = match hex::decode(&r_hash_str) {
        Ok(h) => h,
        Err(e) => return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &format!("encoding/hex: {e}"), false),
    };
    if hash.len() != 32 {
        let msg = format!("payment hash must be exactly 32 bytes, is instead {}", hash.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false);
    }
    let found = {
        let state = shared.state.lock();
        state.by_hash.get(hash.as_slice()).map(|&i| state.invoices[i].to_json())
    };
    match (found, fault) {
        (None, _) => gateway_error(StatusCode::NOT_FOUND, 5, "unable to locate invoice", false),
        (Some(v), Some(f)) => json_response(StatusCode::OK, corrupt(v, f, "r_hash")),
        (Some(v), None) => json_response(StatusCode::OK, v.to_string()),
    }
}

async fn list_invoices(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let fault = shared.take_fault(Route::ListInvoices);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let number = |k: &str| q.get(k).map(|v| v.parse::<u64>()).transpose();
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let (Ok(offset), Ok(max)) = (number("index_offset"), number("num_max_invoices")) else {
        return gateway_error(StatusCode::BAD_REQUEST, 3, "invalid value for uint64 query parameter", false);
    };
    let offset = offset.unwrap_or(0);
    let max = match max.unwrap_or(0) {
        0 => 100,
        n => n,
    } as usize;
    let (reversed, pending_only) = (flag("reversed"), flag("pending_only"));
    let state = shared.state.lock();
    let wanted = |inv: &&Stored| !pending_only || matches!(inv.state, InvoiceState::Open | InvoiceState::Accepted);
    let page: Vec<&Stored> = if reversed {
        let below = |inv: &&Stored| offset == 0 || inv.add_index < offset;
        let mut p: Vec<&Stored> = state.invoices.iter().rev().filter(below).filter(wanted).take(max).collect();
        p.reverse();
        p
    } else {
        state.invoices.iter().filter(|inv| inv.add_index > offset).filter(wanted).take(max).collect()
    };
    let first = page.first().map_or(0, |i| i.add_index);
    let last = page.last().map_or(0, |i| i.add_index);
    let mut answer = json!({
        "invoices": page.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
        "last_index_offset": last.to_string(),
        "first_index_offset": first.to_string(),
    });
    drop(state);
    if let Some(f) = fault {
        if let Some(first_invoice) = answer["invoices"].get_mut(0) {
            let corrupted = corrupt(first_invoice.take(), f, "r_hash");
            // A corrupted invoice that is still JSON stays in place; otherwise the body breaks.
            match serde_json::from_str(&corrupted) {
                Ok(v) => *first_invoice = v,
                Err(_) => return json_response(StatusCode::OK, corrupted),
            }
        } else {
            return json_response(StatusCode::OK, corrupt(answer, f, "r_hash"));
        }
    }
    json_response(StatusCode::OK, answer.to_string())
}

/// Which updates a stream forwards.
#[derive(Debug, Clone, Copy)]
enum Follow {
    /// `SubscribeInvoices`: adds and settles.
    All,
    /// `SubscribeSingleInvoice`: every change of one invoice, until a final state.
    One([u8; 32]),
}

fn result_line(inv: &Stored) -> Bytes {
    Bytes::from(format!("{}\n", json!({"result": inv.to_json()})))
}

/// A stream line carrying `fault`, built on `sample` (an invoice to corrupt).
fn fault_line(fault: Fault, sample: Option<&Stored>) -> Bytes {
    match fault {
        Fault::StreamError => Bytes::from(format!(
            "{}\n",
            json!({"error": {"code": 2, "message": "injected stream error", "details": []}})
        )),
        Fault::Truncated => {
            let line =
                sample.map(result_line).unwrap_or_else(|| Bytes::from_static(b"{\"result\":{\"r_hash\":\"AAAA\"}}\n"));
            line.slice(..line.len() / 2)
        }
        other => {
            let invoice = sample.map(Stored::to_json).unwrap_or_else(|| json!({"r_hash": STANDARD.encode([0u8; 32])}));
            let corrupted = corrupt(invoice, other, "r_hash");
            match serde_json::from_str::<Value>(&corrupted) {
                Ok(v) => Bytes::from(format!("{}\n", json!({"result": v}))),
                Err(_) => Bytes::from(format!("{corrupted}\n")),
            }
        }
    }
}

/// Counts a stream as open while its body lives.
struct OpenStream {
    shared: Arc<Shared>,
    route: Route,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.stream_closed(self.route);
    }
}

enum Step {
    Cut(bool),
    Event(Box<std::result::Result<Event, broadcast::error::RecvError>>),
}

struct StreamBody {
    backlog: VecDeque<Bytes>,
    events: Option<broadcast::Receiver<Event>>,
    follow: Follow,
    cut: watch::Receiver<Cut>,
    generation: u64,
    done: bool,
    _open: OpenStream,
}

/// A streaming answer: `backlog` lines first, then matching events until a cut or the end.
/// As grpc-gateway, it sends the response head only with the first line.
async fn stream_response(
    shared: &Arc<Shared>,
    route: Route,
    backlog: VecDeque<Bytes>,
    events: Option<broadcast::Receiver<Event>>,
    follow: Follow,
) -> Response {
    shared.stream_opened(route);
    let cut = shared.cut.subscribe();
    let generation = cut.borrow().generation;
    let state = StreamBody {
        backlog,
        done: events.is_none(),
        events,
        follow,
        cut,
        generation,
        _open: OpenStream { shared: shared.clone(), route },
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        if let Some(line) = st.backlog.pop_front() {
            return Some((Ok::<Bytes, std::io::Error>(line), st));
        }
        if st.done {
            return None;
        }
        loop {
            let events = st.events.as_mut()?;
            let generation = st.generation;
            let step = tokio::select! {
                cut = st.cut.wait_for(|c| c.generation > generation) => Step::Cut(cut.map(|c| c.abort).unwrap_or(true)),
                event = events.recv() => Step::Event(Box::new(event)),
            };
            match step {
                Step::Cut(abort) => {
                    st.done = true;
                    if abort {
                        return Some((Err(std::io::Error::other("stream cut by the LND stand-in")), st));
                    }
                    return None;
                }
                Step::Event(event) => match *event {
                    Ok(ev) => {
                        let forward = match st.follow {
                            Follow::All => matches!(ev.kind, EventKind::Added | EventKind::Settled),
                            Follow::One(hash) => ev.invoice.hash == hash,
                        };
                        if !forward {
                            continue;
                        }
                        if let Follow::One(_) = st.follow {
                            st.done = ev.invoice.state.is_final();
                        }
                        return Some((Ok(result_line(&ev.invoice)), st));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        st.done = true;
                        let message = format!("subscriber lagged by {n} events");
                        let line = json!({"error": {"code": 8, "message": message, "details": []}});
                        return Some((Ok(Bytes::from(format!("{line}\n"))), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    });
    let mut body = Box::pin(body.fuse());
    let first = body.next().await;
    let mut resp = Response::new(Body::from_stream(futures::stream::iter(first).chain(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An answer on a streaming route that carries a fault: status, or one line and the end.
async fn stream_fault(shared: &Arc<Shared>, route: Route, fault: Fault) -> Response {
    if fault == Fault::Hang {
        return hang().await;
    }
    if let Some(resp) = fault_status(fault, true) {
        return resp;
    }
    let sample = shared.state.lock().invoices.last().cloned();
    stream_response(shared, route, VecDeque::from([fault_line(fault, sample.as_ref())]), None, Follow::All).await
}

async fn subscribe_invoices(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(fault) = shared.take_fault(Route::SubscribeInvoices) {
        return stream_fault(&shared, Route::SubscribeInvoices, fault).await;
    }
    let number = |k: &str| q.get(k).map(|v| v.parse::<u64>()).transpose();
    let (Ok(add_index), Ok(settle_index)) = (number("add_index"), number("settle_index")) else {
        return gateway_error(StatusCode::BAD_REQUEST, 3, "invalid value for uint64 query parameter", false);
    };
    let (add_index, settle_index) = (add_index.unwrap_or(0), settle_index.unwrap_or(0));
    let (backlog, events) = {
        // Registered under the lock, so that no change falls between the replay and the live part.
        let state = shared.state.lock();
        let mut backlog = VecDeque::new();
        // As LND's InvoicesAddedSince / InvoicesSettledSince: index 0 replays nothing.
        if add_index > 0 {
            backlog.extend(state.invoices.iter().filter(|i| i.add_index > add_index).map(result_line));
        }
        if settle_index > 0 {
            let mut settled: Vec<&Stored> = state.invoices.iter().filter(|i| i.settle_index > settle_index).collect();
            settled.sort_by_key(|i| i.settle_index);
            backlog.extend(settled.into_iter().map(result_line));
        }
        (backlog, shared.events.subscribe())
    };
    stream_response(&shared, Route::SubscribeInvoices, backlog, Some(events), Follow::All).await
}

async fn subscribe_single_invoice(State(shared): State<Arc<Shared>>, UrlPath(r_hash): UrlPath<String>) -> Response {
    if let Some(fault) = shared.take_fault(Route::SubscribeSingleInvoice) {
        return stream_fault(&shared, Route::SubscribeSingleInvoice, fault).await;
    }
    // grpc-gateway decodes a bytes path parameter as padded standard, then URL-safe, base64.
    let hash = match STANDARD.decode(&r_hash).or_else(|_| URL_SAFE.decode(&r_hash)) {
        Ok(h) => h,
        Err(e) => {
            let msg = format!("type mismatch, parameter: r_hash, error: {e}");
            return gateway_error(StatusCode::BAD_REQUEST, 3, &msg, false);
        }
    };
    let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
        let msg = format!("invalid hash length of {}, want 32", hash.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, true);
    };
    let (backlog, events) = {
        let state = shared.state.lock();
        // The current state first; an unknown invoice is waited for, as LND does.
        let current = state.by_hash.get(&hash).map(|&i| state.invoices[i].clone());
        let final_now = current.as_ref().is_some_and(|c| c.state.is_final());
        let backlog: VecDeque<Bytes> = current.iter().map(result_line).collect();
        (backlog, if final_now { None } else { Some(shared.events.subscribe()) })
    };
    stream_response(&shared, Route::SubscribeSingleInvoice, backlog, events, Follow::One(hash)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn invoices_are_signed_bolt11_with_the_requested_terms() {
        let standin = LndStandin::start().await.unwrap();
        let stored = standin.shared.add_invoice("memo".into(), 12_345, 600).unwrap();
        let parsed: lightning_invoice::Bolt11Invoice = stored.payment_request.parse().unwrap();
        assert_eq!(parsed.currency(), Currency::Regtest);
        assert_eq!(parsed.amount_milli_satoshis(), Some(12_345));
        assert_eq!(parsed.payment_hash().to_byte_array(), stored.hash);
        assert_eq!(sha256::Hash::hash(&stored.preimage).to_byte_array(), stored.hash);
        assert_eq!(parsed.expiry_time(), Duration::from_secs(600));
        assert_eq!(parsed.min_final_cltv_expiry_delta(), CLTV_EXPIRY_DELTA);
        assert_eq!(parsed.payment_secret().0, stored.payment_addr);
        assert_eq!(hex::encode(parsed.recover_payee_pub_key().serialize()), standin.node_public_key());
        assert_eq!(stored.add_index, 1);
    }

    #[tokio::test]
    async fn expiry_cancels_open_invoices_only() {
        let standin = LndStandin::start().await.unwrap();
        let a = standin.shared.add_invoice("a".into(), 1000, 60).unwrap();
        let b = standin.shared.add_invoice("b".into(), 1000, 60).unwrap();
        let c = standin.shared.add_invoice("c".into(), 1000, 3600).unwrap();
        standin.settle(&PaymentHash(b.hash)).unwrap();
        standin.advance_time(Duration::from_secs(61));
        let state = |s: &Stored| standin.invoice(&PaymentHash(s.hash)).unwrap().state;
        assert_eq!(
            (state(&a), state(&b), state(&c)),
            (InvoiceState::Canceled, InvoiceState::Settled, InvoiceState::Open)
        );
        assert!(standin.settle(&PaymentHash(a.hash)).is_err());
    }
}
