//! Integration tests of the Lightning bridge: `LndRest` and the `SettlementWatcher` against the
//! LND REST stand-in (`lnd_standin`), and the invoices it issues checked by `lightning-invoice`
//! and by an independent decoder, the npm package `bolt11` (installed by scripts/peers/install).

mod invoices;
mod malformed;
mod subscriptions;
mod watcher;

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use kalima_bridge_lightning::{Invoice, InvoiceStream};

/// A safety net only: every wait in these tests is for a signal, and this bounds a hang.
pub(crate) const SAFETY_NET: Duration = Duration::from_secs(60);

/// Awaits `fut`, failing the test if it hangs.
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(SAFETY_NET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after {SAFETY_NET:?}"),
    }
}

/// The next invoice of a stream, which must neither end nor fail.
pub(crate) async fn next_invoice(stream: &mut InvoiceStream, what: &str) -> Invoice {
    match within(what, stream.next()).await {
        Some(Ok(invoice)) => invoice,
        Some(Err(e)) => panic!("{what}: stream error: {e:#}"),
        None => panic!("{what}: stream ended"),
    }
}

/// What the npm `bolt11` package reads in a payment request.
const BOLT11_DECODE_JS: &str = r#"
const bolt11 = require('bolt11');
const d = bolt11.decode(process.argv[1]);
const tag = (name) => { const t = d.tags.find((t) => t.tagName === name); return t === undefined ? null : t.data; };
process.stdout.write(JSON.stringify({
  network: d.network.bech32,
  millisatoshis: d.millisatoshis,
  timestamp: d.timestamp,
  payee: d.payeeNodeKey,
  payment_hash: tag('payment_hash'),
  description: tag('description'),
  expire_time: tag('expire_time'),
  payment_secret: tag('payment_secret'),
  min_final_cltv_expiry: tag('min_final_cltv_expiry'),
}));
"#;

/// Decodes a BOLT11 request with the npm `bolt11` package (an independent implementation).
pub(crate) fn decode_with_npm_bolt11(payment_request: &str) -> serde_json::Value {
    let peers = match std::env::var_os("KALIMA_PEERS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kalima-peers"),
    };
    let modules = peers.join("npm/node_modules");
    assert!(
        modules.join("bolt11/package.json").is_file(),
        "the npm package bolt11 is missing from {}: run scripts/peers/install",
        modules.display()
    );
    let output = Command::new("node")
        .env("NODE_PATH", &modules)
        .arg("-e")
        .arg(BOLT11_DECODE_JS)
        .arg(payment_request)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js, then run scripts/peers/install"));
    assert!(
        output.status.success(),
        "npm bolt11 refused {payment_request}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("npm bolt11 printed no JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}
