//! The stand-in's state, shared by the handle, the server and the handlers: the invoice book
//! (add and settle indexes, the moved clock), the events that streams follow, injected faults and
//! open-stream counts; and what changes the book: issuing BOLT11 invoices signed by the node key,
//! settling or canceling one, and expiring OPEN invoices (the expiry loop).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bitcoin::hashes::{Hash as _, sha256};
use bitcoin::secp256k1::{Secp256k1, SecretKey, SignOnly};
use lightning_invoice::{Currency, InvoiceBuilder, PaymentSecret};
use parking_lot::Mutex;
use rand::RngCore as _;
use tokio::sync::{Notify, broadcast, watch};

use super::invoice::{CLTV_EXPIRY_DELTA, Stored};
use super::{Fault, Route};
use crate::error::{Error, Result};
use crate::types::{Invoice, InvoiceState, PaymentHash};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventKind {
    Added,
    Settled,
    Changed,
}

#[derive(Debug, Clone)]
pub(super) struct Event {
    pub(super) kind: EventKind,
    pub(super) invoice: Stored,
}

#[derive(Default)]
pub(super) struct Book {
    /// By add index - 1.
    pub(super) invoices: Vec<Stored>,
    pub(super) by_hash: HashMap<[u8; 32], usize>,
    pub(super) settle_count: u64,
    pub(super) clock_offset: Duration,
}

/// A request to cut every open stream: `abort` cuts the connection, otherwise the stream ends.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cut {
    pub(super) generation: u64,
    pub(super) abort: bool,
}

pub(super) struct Shared {
    pub(super) state: Mutex<Book>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) cut: watch::Sender<Cut>,
    pub(super) open_streams: watch::Sender<HashMap<Route, usize>>,
    pub(super) faults: watch::Sender<HashMap<Route, VecDeque<Fault>>>,
    pub(super) expiry_wake: Notify,
    pub(super) macaroon: Vec<u8>,
    pub(super) cert_pem: String,
    pub(super) tls: Arc<rustls::ServerConfig>,
    pub(super) secp: Secp256k1<SignOnly>,
    pub(super) node_key: SecretKey,
    pub(super) currency: Currency,
}

impl Shared {
    fn now(&self, state: &Book) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + state.clock_offset
    }

    pub(super) fn take_fault(&self, route: Route) -> Option<Fault> {
        let mut taken = None;
        self.faults.send_if_modified(|f| {
            taken = f.get_mut(&route).and_then(VecDeque::pop_front);
            taken.is_some()
        });
        taken
    }

    pub(super) fn update(
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
    pub(super) fn expire_due(&self) -> Option<Duration> {
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

    pub(super) fn add_invoice(
        &self,
        memo: String,
        value_msat: u64,
        expiry_secs: u64,
    ) -> std::result::Result<Stored, String> {
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

    pub(super) fn stream_opened(&self, route: Route) {
        self.open_streams.send_modify(|m| *m.entry(route).or_default() += 1);
    }

    pub(super) fn stream_closed(&self, route: Route) {
        self.open_streams.send_modify(|m| {
            if let Some(n) = m.get_mut(&route) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

pub(super) async fn expiry_loop(shared: Arc<Shared>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lnd_standin::LndStandin;

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
