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
//!
//! This module holds the handle and its controls; the parts of the server sit beside it:
//! `state` (the invoice book, events, faults, expiry), `invoice` (one stored invoice and its JSON),
//! `server` (TLS and the accept loop), `routes` (the router, the macaroon check, the unary calls),
//! `streams` (the two subscriptions) and `answers` (grpc-gateway errors and injected faults).

mod answers;
mod invoice;
mod routes;
mod server;
mod state;
mod streams;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use lightning_invoice::Currency;
use parking_lot::Mutex;
use rand::RngCore as _;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;

use self::server::{lnd_like_tls, serve};
use self::state::{Book, Cut, EventKind, Shared, expiry_loop};
use crate::error::{Error, Result};
use crate::lnd::{LndRest, Macaroon};
use crate::types::{Invoice, InvoiceState, PaymentHash};

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
