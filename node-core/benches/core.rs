//! Throughput of the core write path, stage by stage: canonical encoding + leaf hash,
//! sealing, durable store appends, and whole commits through the sequencer (no HTTP).
//! Run: `cargo bench -p kalima-core --bench core [-- --storage postgres://...]`.

use std::sync::Arc;
use std::time::Instant;

use kalima_core::chain::{Chain, ChainConfig};
use kalima_core::keys::{DataKeys, NodeKey};
use kalima_core::store::Store;
use kalima_core::tx::{Transaction, TxContent};

fn reading(i: u64) -> TxContent {
    TxContent {
        device_id: "bench".into(),
        address: format!("/bench/line-{}", i % 16),
        key: format!("sensor-{}", i % 1000),
        body: format!("{{\"unit\":\"C\",\"value\":{}}}", i % 1000).into_bytes(),
        ..TxContent::default()
    }
}

/// Registers the `bench` device with a write grant on `/bench`, as the admin API would.
fn genesis() -> Vec<TxContent> {
    use kalima_core::registry::{DEVICES_ADDRESS, DeviceRecord, GrantRecord, NODE_DEVICE_ID, grants_address};
    let record = DeviceRecord {
        token_sha256: String::new(),
        public_key: None,
        require_signature: false,
        admin: false,
        revoked: false,
    };
    let grant = GrantRecord { read: true, write: true };
    vec![
        TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: DEVICES_ADDRESS.into(),
            key: "bench".into(),
            body: serde_json::to_vec(&record).expect("record"),
            ..TxContent::default()
        },
        TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: grants_address("bench"),
            key: "/bench".into(),
            body: serde_json::to_vec(&grant).expect("grant"),
            ..TxContent::default()
        },
    ]
}

fn rate(label: &str, n: u64, started: Instant) {
    let s = started.elapsed().as_secs_f64();
    println!("{label:<40} {n:>9} in {s:>6.2} s = {:>10.0}/s", n as f64 / s);
}

#[tokio::main]
async fn main() {
    let storage = std::env::args().skip_while(|a| a != "--storage").nth(1);
    let n: u64 = 200_000;

    let started = Instant::now();
    let mut bytes = 0usize;
    for i in 0..n {
        let tx =
            Transaction { global_sequence: i, sequence: i, timestamp_ms: 0, previous: [0; 32], content: reading(i) };
        let b = tx.encode();
        bytes += b.len();
        std::hint::black_box(kalima_core::merkle::leaf_hash(&b));
    }
    rate("encode + leaf hash", n, started);
    println!("  mean canonical transaction: {} bytes", bytes as u64 / n);

    let keys = DataKeys::ephemeral();
    let plain = vec![7u8; bytes / n as usize];
    let started = Instant::now();
    for i in 0..n {
        std::hint::black_box(keys.seal(&plain, &i.to_be_bytes()).ok());
    }
    rate("seal (AES-256-GCM)", n, started);

    let dir = tempfile::tempdir().expect("tempdir");
    let url = storage.unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.path().display()));
    let store = Store::connect(&url, Arc::new(DataKeys::ephemeral())).await.expect("store");
    let config = ChainConfig { checkpoint_interval: None, ..ChainConfig::default() };
    let (chain, _task) = Chain::open(store, NodeKey::generate(), config, genesis()).await.expect("chain");

    for (label, batch, writers) in [
        ("chain commits, batches of 1000, 8 writers", 1000u64, 8u64),
        ("chain commits, single writes, 256 writers", 1, 256),
    ] {
        let per_writer = n / writers / batch;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let chain: Chain = chain.clone();
            tasks.push(tokio::spawn(async move {
                for b in 0..per_writer {
                    let items = (0..batch).map(|j| reading(w * 1_000_000 + b * batch + j)).collect();
                    chain.submit(items, None).await.expect("commit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        rate(label, per_writer * batch * writers, started);
    }
    chain.shutdown();
}
