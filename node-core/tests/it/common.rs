//! Shared harness: one fresh database per test on each backend (a SQLite file in a temp dir,
//! or a PostgreSQL database created for the test and dropped after it), the data-key file
//! beside it, a chain opener, a direct block builder for store-level tests, and the raw-SQL
//! helpers a tamperer would use.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use kalima_core::block::BlockHeader;
use kalima_core::chain::Guard;
use kalima_core::keys::{DATA_KEYS_FILE, DataKeys, NodeKey};
use kalima_core::merkle::{Frontier, Hash, leaf_hash};
use kalima_core::registry::{ADMIN_ID, DEVICES_ADDRESS, DeviceRecord, GrantRecord, grants_address, token_digest};
use kalima_core::store::{Backend, BlockRecord, PendingTx};
use kalima_core::tx::{Transaction, TxContent};
use kalima_core::{Chain, ChainConfig, CommittedTx, Receipt, Store};
use sqlx::Connection;
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// Env var naming the PostgreSQL server the tests create their databases on.
pub(crate) const PG_URL_VAR: &str = "KALIMA_TEST_PG_URL";
/// Token of the admin device registered in the test genesis.
pub(crate) const ADMIN_TOKEN: &str = "kal_admin-token-for-tests";
/// Chain name used by every test.
pub(crate) const CHAIN: &str = "kalima-it";

/// Both real backends; every scenario runs on each (see [`backend_tests!`]).
pub(crate) fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

/// A fresh, empty database for one test plus the directory holding its key files.
pub(crate) struct TestDb {
    pub(crate) backend: Backend,
    pub(crate) url: String,
    pub(crate) dir: TempDir,
}

impl TestDb {
    /// Where the data-key ring of this test lives (created on first [`TestDb::store`]).
    pub(crate) fn keys_path(&self) -> PathBuf {
        self.dir.path().join(DATA_KEYS_FILE)
    }

    /// Opens the store with the key ring currently on disk, as a restarting node would.
    pub(crate) async fn store(&self) -> Store {
        let path = self.keys_path();
        let keys = if path.exists() {
            DataKeys::load(&path).expect("load data keys")
        } else {
            DataKeys::create(&path).expect("create data keys")
        };
        self.store_with(keys).await
    }

    /// Opens the store with an explicit key ring.
    pub(crate) async fn store_with(&self, keys: DataKeys) -> Store {
        Store::connect(&self.url, Arc::new(keys))
            .await
            .unwrap_or_else(|e| panic!("connect {:?} store at {}: {e:#}", self.backend, self.url))
    }

    /// Opens a chain (creating genesis on an empty store) with periodic checkpoints off.
    pub(crate) async fn chain(&self) -> TestChain {
        self.chain_with(test_config()).await
    }

    /// Opens a chain with `config`.
    pub(crate) async fn chain_with(&self, config: ChainConfig) -> TestChain {
        let store = self.store().await;
        let (chain, task) = Chain::open(store, node_key(), config, genesis())
            .await
            .unwrap_or_else(|e| panic!("open chain on {:?}: {e:#}", self.backend));
        TestChain { chain, task }
    }
}

/// A running chain and its sequencer task.
pub(crate) struct TestChain {
    pub(crate) chain: Chain,
    pub(crate) task: JoinHandle<kalima_core::Result<()>>,
}

impl TestChain {
    /// Stops the node as `kalima up` does on SIGTERM: `shutdown()`, then wait for the
    /// sequencer to finish what is queued and end; the store can then be reopened.
    pub(crate) async fn stop(self) {
        let TestChain { chain, task } = self;
        let store = chain.store().clone();
        chain.shutdown();
        task.await.expect("sequencer task panicked").expect("sequencer ended with an error");
        drop(chain);
        store.close().await;
    }

    /// Stops the node the hard way, as a crash or a kill would: the sequencer task is aborted
    /// between commits.
    pub(crate) async fn kill(self) {
        let TestChain { chain, task } = self;
        let store = chain.store().clone();
        task.abort();
        let _ = task.await;
        drop(chain);
        store.close().await;
    }
}

/// Engine config for tests: no background checkpoint task.
pub(crate) fn test_config() -> ChainConfig {
    ChainConfig { chain: CHAIN.into(), checkpoint_interval: None, ..Default::default() }
}

/// The node identity used by every test (fixed, so checkpoints are reproducible).
pub(crate) fn node_key() -> NodeKey {
    NodeKey::from_seed([7; 32])
}

/// Genesis: the admin device, as `kalima init` registers it.
pub(crate) fn genesis() -> Vec<TxContent> {
    vec![device_registration(ADMIN_ID, ADMIN_TOKEN, true, None, false)]
}

/// A device registration transaction (the body of a `/_kalima/devices` value).
pub(crate) fn device_registration(
    id: &str,
    token: &str,
    admin: bool,
    public_key: Option<String>,
    require_signature: bool,
) -> TxContent {
    let record =
        DeviceRecord { token_sha256: token_digest(token), public_key, require_signature, admin, revoked: false };
    TxContent {
        device_id: ADMIN_ID.into(),
        address: DEVICES_ADDRESS.into(),
        key: id.into(),
        body: serde_json::to_vec(&record).expect("device record to JSON"),
        ..Default::default()
    }
}

/// A grant transaction for `device` on `prefix`.
pub(crate) fn grant(device: &str, prefix: &str, read: bool, write: bool) -> TxContent {
    TxContent {
        device_id: ADMIN_ID.into(),
        address: grants_address(device),
        key: prefix.into(),
        body: serde_json::to_vec(&GrantRecord { read, write }).expect("grant to JSON"),
        ..Default::default()
    }
}

/// A transaction removing the grant of `device` on `prefix` (an empty body deletes it).
pub(crate) fn grant_removal(device: &str, prefix: &str) -> TxContent {
    TxContent { body: Vec::new(), ..grant(device, prefix, false, false) }
}

/// Registers a device with grants through the sequencer, as the admin API does.
pub(crate) async fn register_device(chain: &Chain, id: &str, token: &str, grants: &[(&str, bool, bool)]) {
    let mut items = vec![device_registration(id, token, false, None, false)];
    items.extend(grants.iter().map(|(p, r, w)| grant(id, p, *r, *w)));
    chain.submit(items, Some(Guard::DeviceAbsent(id.into()))).await.expect("register device");
}

/// A put (or, with an empty body, a delete) by `device`.
pub(crate) fn put(device: &str, address: &str, key: &str, body: &[u8]) -> TxContent {
    TxContent {
        device_id: device.into(),
        address: address.into(),
        key: key.into(),
        body: body.to_vec(),
        ..Default::default()
    }
}

/// Submits one transaction and returns its receipt.
pub(crate) async fn submit_one(chain: &Chain, c: TxContent) -> Receipt {
    let mut r = chain.submit(vec![c], None).await.expect("submit");
    assert_eq!(r.len(), 1, "one receipt per transaction");
    r.remove(0)
}

/// Every committed transaction, in global order.
pub(crate) async fn all_txs(store: &Store) -> Vec<CommittedTx> {
    let n = store.tx_count().await.expect("tx_count");
    let txs = store.txs_between(0, n, u32::MAX).await.expect("txs_between");
    assert_eq!(txs.len() as u64, n, "every stored transaction reads back");
    txs
}

/// Every block header as stored (decoded from the raw header column), in height order.
pub(crate) async fn all_blocks(store: &Store) -> Vec<BlockHeader> {
    let raw = store.raw_blocks(0, u32::MAX).await.expect("raw_blocks");
    raw.iter().map(|b| BlockHeader::decode(&b.header).expect("stored header decodes")).collect()
}

/// Polls `check` every 50 ms until it returns `Some` or `limit` passes.
pub(crate) async fn poll_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds coherent blocks (sequences, `previous` links, Merkle roots, hash links) without the
/// sequencer, so the store can be tested on its own.
pub(crate) struct BlockBuilder {
    frontier: Frontier,
    prev_hash: Hash,
    next_height: u64,
    addr_seq: HashMap<String, u64>,
    last: HashMap<(String, String), Hash>,
}

impl BlockBuilder {
    pub(crate) fn new() -> Self {
        Self {
            frontier: Frontier::new(),
            prev_hash: [0; 32],
            next_height: 0,
            addr_seq: HashMap::new(),
            last: HashMap::new(),
        }
    }

    /// The next block holding `items`, stamped `timestamp_ms`.
    pub(crate) fn block(&mut self, items: Vec<TxContent>, timestamp_ms: i64) -> (BlockRecord, Vec<PendingTx>) {
        let height = self.next_height;
        let mut pending = Vec::with_capacity(items.len());
        for content in items {
            let seq = self.addr_seq.entry(content.address.clone()).or_insert(0);
            *seq += 1;
            let k = (content.address.clone(), content.key.clone());
            let tx = Transaction {
                global_sequence: self.frontier.len(),
                sequence: *seq,
                timestamp_ms,
                previous: self.last.get(&k).copied().unwrap_or([0; 32]),
                content,
            };
            let bytes = tx.encode();
            let id = leaf_hash(&bytes);
            self.last.insert(k, id);
            self.frontier.push(id);
            pending.push(PendingTx { committed: Arc::new(CommittedTx { tx, id, height }), bytes });
        }
        let header = BlockHeader {
            height,
            prev_hash: self.prev_hash,
            timestamp_ms,
            tx_count: pending.len() as u32,
            tree_size: self.frontier.len(),
            merkle_root: self.frontier.root(),
            leader: node_key().public_hex(),
        };
        let hash = header.hash();
        self.prev_hash = hash;
        self.next_height += 1;
        (BlockRecord { header, hash }, pending)
    }
}

/// Hex literal of a blob in the backend's SQL dialect.
pub(crate) fn blob_literal(backend: Backend, bytes: &[u8]) -> String {
    match backend {
        Backend::Sqlite => format!("X'{}'", hex::encode(bytes)),
        Backend::Postgres => format!("'\\x{}'::bytea", hex::encode(bytes)),
    }
}

/// Turns the immutability triggers off, as someone with write access to the database could.
pub(crate) async fn drop_immutability_triggers(store: &Store) {
    let sql = match store.backend() {
        Backend::Sqlite => CHAIN_TABLES
            .iter()
            .map(|t| format!("DROP TRIGGER {t}_no_update; DROP TRIGGER {t}_no_delete;"))
            .collect::<String>(),
        Backend::Postgres => {
            CHAIN_TABLES.iter().map(|t| format!("ALTER TABLE {t} DISABLE TRIGGER USER;")).collect::<String>()
        }
    };
    store.execute_raw(&sql).await.expect("drop immutability triggers");
}

/// Every table the node only ever appends to.
pub(crate) const CHAIN_TABLES: [&str; 8] =
    ["blocks", "block_txs", "tx_ids", "tx_by_stream", "tx_by_address", "tx_idempotency", "checkpoints", "store_meta"];

/// Data-key ring JSON with the given keys, as `data-keys.json` stores it.
pub(crate) fn key_ring_json(active: u32, keys: &BTreeMap<u32, String>) -> String {
    serde_json::json!({ "active": active, "keys": keys }).to_string()
}

// ----------------------------------------------------------------------------------------
// Running a scenario on a backend.

/// Runs `body` on a fresh database of `backend`; the PostgreSQL database is dropped afterwards
/// (best effort), also when the body panics.
pub(crate) async fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}/kalima.db", dir.path().display());
            body(TestDb { backend, url, dir }).await;
        }
        Backend::Postgres => {
            let admin_url = pg_url();
            let name = format!("kalima_it_{:016x}", rand::random::<u64>());
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("connect to {PG_URL_VAR}={admin_url}: {e}"));
            sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name} (the role of {PG_URL_VAR} needs CREATEDB): {e}"));
            let url = with_database(&admin_url, &name);
            let outcome = AssertUnwindSafe(body(TestDb { backend, url, dir })).catch_unwind().await;
            // Best effort: a leftover database is harmless and named so it is easy to spot.
            let _ =
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await;
            let _ = admin.close().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

fn pg_url() -> String {
    match std::env::var(PG_URL_VAR) {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "{PG_URL_VAR} is not set: the PostgreSQL variant of this test needs a server.\n\
             Start one with `eval \"$(scripts/peers/postgres start)\"` from the workspace root \
             (install PostgreSQL first with `scripts/peers/install`), then run the tests again."
        ),
    }
}

/// `url` with its database name replaced by `db` (query parameters kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Declares each listed `async fn(TestDb)` scenario as one test per backend:
/// `<module>::sqlite::<name>` and `<module>::postgres::<name>`.
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run(kalima_core::store::Backend::Sqlite, super::$name).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run(kalima_core::store::Backend::Postgres, super::$name).await;
                }
            )+
        }
    };
}
pub(crate) use backend_tests;

#[test]
fn database_name_is_replaced_in_urls() {
    assert_eq!(with_database("postgres://k:k@127.0.0.1:5/kalima_test", "x"), "postgres://k:k@127.0.0.1:5/x");
    assert_eq!(with_database("postgres://k@h:5/db?sslmode=disable", "x"), "postgres://k@h:5/x?sslmode=disable");
    assert_eq!(with_database("postgresql://h:5", "x"), "postgresql://h:5/x");
}

#[test]
fn both_backends_are_exercised() {
    assert_eq!(backends(), [Backend::Sqlite, Backend::Postgres]);
}
