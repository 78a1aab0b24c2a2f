//! A chain for other crates' tests: SQLite in a temporary directory, the admin device in
//! genesis (as `kalima init` registers it), and the admin API's device and grant changes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chain::Guard;
use crate::keys::{DataKeys, NodeKey};
use crate::registry::{ADMIN_ID, DEVICES_ADDRESS, Device, DeviceRecord, GrantRecord, grants_address, token_digest};
use crate::tx::TxContent;
use crate::{Chain, ChainConfig, CommittedTx, Ingest, Store};

/// The token of test device `id`.
pub fn token(id: &str) -> String {
    format!("kal_{id}-token-for-tests")
}

fn device_record(id: &str, admin: bool, revoked: bool) -> TxContent {
    device_record_with_key(id, admin, revoked, None)
}

fn device_record_with_key(id: &str, admin: bool, revoked: bool, key: Option<&NodeKey>) -> TxContent {
    let record = DeviceRecord {
        token_sha256: token_digest(&token(id)),
        public_key: key.map(NodeKey::public_hex),
        require_signature: key.is_some(),
        admin,
        revoked,
    };
    TxContent {
        device_id: ADMIN_ID.into(),
        address: DEVICES_ADDRESS.into(),
        key: id.into(),
        body: serde_json::to_vec(&record).unwrap_or_default(),
        ..TxContent::default()
    }
}

fn grant_tx(device: &str, prefix: &str, read: bool, write: bool) -> TxContent {
    // Both false removes the grant, as `POST /api/v1/devices/{id}/grants` does.
    let body =
        if read || write { serde_json::to_vec(&GrantRecord { read, write }).unwrap_or_default() } else { Vec::new() };
    TxContent {
        device_id: ADMIN_ID.into(),
        address: grants_address(device),
        key: prefix.into(),
        body,
        ..TxContent::default()
    }
}

/// A running chain on a fresh SQLite file, with its ingest (8 KB bodies, as the node runs it).
pub struct TestChain {
    /// The chain.
    pub chain: Chain,
    /// Its write path.
    pub ingest: Ingest,
    _task: tokio::task::JoinHandle<crate::Result<()>>,
    dir: tempfile::TempDir,
    keys: Arc<DataKeys>,
}

impl TestChain {
    /// Opens a chain named `name` whose genesis registers the admin device.
    pub async fn start(name: &str) -> TestChain {
        Self::open(name, tempfile::tempdir().expect("temp dir"), Arc::new(DataKeys::ephemeral())).await
    }

    async fn open(name: &str, dir: tempfile::TempDir, keys: Arc<DataKeys>) -> TestChain {
        let url = format!("sqlite://{}/kalima.db", dir.path().display());
        let store = Store::connect(&url, keys.clone()).await.expect("open SQLite store");
        let config = ChainConfig { chain: name.into(), checkpoint_interval: None, ..Default::default() };
        let (chain, task) =
            Chain::open(store, NodeKey::from_seed([7; 32]), config, vec![device_record(ADMIN_ID, true, false)])
                .await
                .expect("open chain");
        let ingest = Ingest::new(chain.clone(), crate::tx::MAX_BODY);
        TestChain { chain, ingest, _task: task, dir, keys }
    }

    /// Stops the chain cleanly and opens it again from its store (a node restart).
    pub async fn reopen(self) -> TestChain {
        let name = self.chain.config().chain.clone();
        self.chain.shutdown();
        let finished = self._task.await.expect("the chain task panicked");
        finished.expect("the chain task failed");
        self.chain.store().close().await;
        Self::open(&name, self.dir, self.keys).await
    }

    /// The test's private directory (the database lives there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Registers device `id` (token [`token`]) with `(prefix, read, write)` grants.
    pub async fn register(&self, id: &str, grants: &[(&str, bool, bool)]) -> Arc<Device> {
        let mut items = vec![device_record(id, false, false)];
        items.extend(grants.iter().map(|(p, r, w)| grant_tx(id, p, *r, *w)));
        self.chain.submit(items, Some(Guard::DeviceAbsent(id.into()))).await.expect("register device");
        self.device(id)
    }

    /// Registers device `id` with a fresh Ed25519 key it must sign with, and returns the key.
    pub async fn register_signing(&self, id: &str) -> NodeKey {
        let key = NodeKey::generate();
        self.chain
            .submit(vec![device_record_with_key(id, false, false, Some(&key))], Some(Guard::DeviceAbsent(id.into())))
            .await
            .expect("register signing device");
        key
    }

    /// Submits one ledger instruction, as the ledger API does.
    pub async fn ledger(&self, instruction: TxContent) -> crate::Result<Vec<crate::Receipt>> {
        self.chain.submit(vec![instruction], Some(Guard::Ledger)).await
    }

    /// Sets (or, with both false, removes) a grant of a registered device.
    pub async fn grant(&self, id: &str, prefix: &str, read: bool, write: bool) -> Arc<Device> {
        self.chain
            .submit(vec![grant_tx(id, prefix, read, write)], Some(Guard::DevicePresent(id.into())))
            .await
            .expect("grant");
        self.device(id)
    }

    /// Revokes a device, as `DELETE /api/v1/devices/{id}` does.
    pub async fn revoke(&self, id: &str) {
        self.chain
            .submit(vec![device_record(id, false, true)], Some(Guard::DevicePresent(id.into())))
            .await
            .expect("revoke");
        assert!(self.device(id).record.revoked, "revocation of {id} did not take");
    }

    /// A registered device.
    pub fn device(&self, id: &str) -> Arc<Device> {
        self.chain.registry().get(id).unwrap_or_else(|| panic!("device {id:?} is not registered"))
    }

    /// The latest committed transaction of `address`/`key`.
    pub fn latest(&self, address: &str, key: &str) -> Option<Arc<CommittedTx>> {
        self.chain.memcache().get(address, key)
    }

    /// Every stored transaction of `address`/`key`, newest first.
    pub async fn history(&self, address: &str, key: &str) -> Vec<CommittedTx> {
        let mut all = Vec::new();
        let mut before = u64::MAX;
        loop {
            let page = self.chain.store().history(address, key, before, 1000).await.expect("history");
            let Some(last) = page.last() else { break };
            before = last.tx.global_sequence;
            all.extend(page);
        }
        all
    }
}

/// Polls `check` every 20 ms until it returns `Some`; panics after `patience` with `what` and
/// the state `describe` gives, so a failure says what was being waited for.
pub async fn wait_for<T>(
    patience: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {patience:?} waiting for {what}; last state:\n{}", describe());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body of a committed transaction as JSON.
pub fn body_json(c: &CommittedTx) -> Value {
    serde_json::from_slice(&c.tx.content.body)
        .unwrap_or_else(|e| panic!("body of {}/{} is not JSON: {e}", c.tx.content.address, c.tx.content.key))
}

/// Whether two JSON values are equal, floats within a relative 1e-9 (integers and every
/// other kind exactly, so an integer must not come out as a float).
pub fn json_close(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) if e.is_f64() => {
            a.is_f64() && {
                let (a, e) = (a.as_f64().unwrap_or(f64::NAN), e.as_f64().unwrap_or(f64::NAN));
                (a - e).abs() <= 1e-9 * e.abs().max(1.0)
            }
        }
        (Value::Object(a), Value::Object(e)) => {
            a.len() == e.len() && e.iter().all(|(k, ev)| a.get(k).is_some_and(|av| json_close(av, ev)))
        }
        (Value::Array(a), Value::Array(e)) => a.len() == e.len() && a.iter().zip(e).all(|(a, e)| json_close(a, e)),
        _ => actual == expected,
    }
}
