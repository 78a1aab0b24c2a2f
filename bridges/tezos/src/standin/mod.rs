//! A stand-in for an Octez node's RPC, for tests (no Octez node runs where the tests run).
//!
//! An axum server on `127.0.0.1:0` answers the calls this crate makes with bodies shaped as
//! Octez returns them for protocol Tallinn (024): the recorded responses in
//! `tests/it/octez/*.json` are its templates, and only the fields that depend on the call
//! (levels, hashes, counters, fees, the anchored values) are filled in. Behind it sits a tiny
//! chain: blocks baked on a timer or on demand, a mempool, counters, revealed keys and the
//! anchoring contract's rules (admin, tree sizes moving forward, 32-byte roots). Faults are
//! scripted: reorgs that take an operation out of its block, injections that are lost.
//!
//! It also checks what it receives: injected bytes must decode, carry a valid signature of
//! the source, match a simulated operation (up to fees and limits), pay at least the minimal
//! fees and give enough gas and storage. Anything wrong is kept in [`StandInOctez::problems`].
//!
//! This module holds the handle, its settings and what it reports; beside it sit `chain` (the
//! state and the chain model: blocks, mempool, context, the contract's rules, baking, reorgs),
//! `recorded` (the recorded responses and the answers built on them) and `routes` (the RPC calls
//! and the checks of what is simulated and injected).

mod chain;
mod recorded;
mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tezos_crypto_rs::hash::PublicKeyEd25519;

use self::chain::{Block, StandIn};
pub use self::recorded::{
    RECORDED_ADMIN, RECORDED_CONSTANTS, RECORDED_CONTRACT, RECORDED_ERROR_CONFLICT, RECORDED_ERROR_COUNTER_IN_THE_PAST,
    RECORDED_HEADER, RECORDED_OPERATIONS_ANCHOR, RECORDED_OPERATIONS_REFUSED_AND_FOREIGN, RECORDED_RUN_FAILWITH,
    RECORDED_RUN_REVEAL_AND_ANCHOR,
};
use self::recorded::{Recorded, recorded_header_field};
use self::routes::handle;
use crate::forge::{OperationGroup, SignedOperation};

/// What the stand-in starts from.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// The anchoring contract's address.
    pub contract: String,
    /// Its admin (the only account allowed to anchor).
    pub admin: String,
    /// Funded accounts and their counters.
    pub accounts: Vec<(String, u64)>,
    /// Accounts whose key is already revealed.
    pub revealed: Vec<PublicKeyEd25519>,
    /// The contract's storage: the last tree size anchored per chain name.
    pub anchored: Vec<(String, u64)>,
    /// Bake a block this often; `None` bakes only on [`StandInOctez::bake`].
    pub block_time: Option<Duration>,
    /// Level of the first block.
    pub first_level: u64,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            contract: RECORDED_CONTRACT.into(),
            admin: RECORDED_ADMIN.into(),
            accounts: vec![(RECORDED_ADMIN.into(), 41)],
            revealed: Vec::new(),
            anchored: Vec::new(),
            block_time: Some(Duration::from_millis(40)),
            first_level: 11_432_100,
        }
    }
}

/// Scripted faults.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// How many times a block holding a manager operation is replaced by a block without it,
    /// once one block is on top of it and a client has seen the operation in it.
    pub reorgs: u32,
    /// Whether the operations of a replaced block go back to the mempool (as Octez does), or
    /// are lost.
    pub requeue_on_reorg: bool,
    /// How many injections are answered with their hash but never reach a block.
    pub lose_injections: u32,
}

/// One injection, as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The hash of the injected bytes.
    pub hash: String,
    /// The decoded operation, when the bytes decode.
    pub operation: Option<SignedOperation>,
    /// Whether the node took it (answered with its hash).
    pub accepted: bool,
    /// Why it was refused.
    pub refusal: Option<String>,
    /// The head's level when it came.
    pub head_level: u64,
}

/// A stand-in Octez node; stopped on drop.
pub struct StandInOctez {
    /// Its RPC URL (`http://127.0.0.1:PORT`).
    pub url: String,
    state: Arc<Mutex<StandIn>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StandInOctez {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StandInOctez {
    /// Starts a stand-in node.
    pub async fn start(config: StandInConfig, faults: Faults) -> std::io::Result<Self> {
        let recorded = Recorded::load();
        let first = Block {
            level: config.first_level,
            hash: recorded_header_field("hash"),
            predecessor: recorded_header_field("predecessor"),
            ops: Vec::new(),
        };
        let block_time = config.block_time;
        let state = Arc::new(Mutex::new(StandIn {
            config,
            faults,
            recorded,
            blocks: vec![first],
            mempool: Vec::new(),
            salt: 0,
            simulations: Vec::new(),
            injections: Vec::new(),
            problems: Vec::new(),
            overrides: HashMap::new(),
            requests: Vec::new(),
            seen: Default::default(),
        }));
        // Two blocks so that `head~2` exists from the start.
        {
            let mut s = state.lock();
            s.bake();
            s.bake();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let mut tasks = vec![tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })];
        if let Some(every) = block_time {
            let s = state.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    s.lock().bake();
                }
            }));
        }
        Ok(Self { url, state, tasks })
    }

    /// Bakes one block (with the mempool's operations).
    pub fn bake(&self) {
        self.state.lock().bake();
    }

    /// The head's level.
    pub fn head_level(&self) -> u64 {
        self.state.lock().head().level
    }

    /// Operations waiting for a block.
    pub fn mempool_len(&self) -> usize {
        self.state.lock().mempool.len()
    }

    /// Every injection so far.
    pub fn injections(&self) -> Vec<Injection> {
        self.state.lock().injections.clone()
    }

    /// Every simulated operation so far.
    pub fn simulations(&self) -> Vec<OperationGroup> {
        self.state.lock().simulations.clone()
    }

    /// What was wrong with what the stand-in received (empty when all was right).
    pub fn problems(&self) -> Vec<String> {
        self.state.lock().problems.clone()
    }

    /// Every call received (`GET /chains/...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().requests.clone()
    }

    /// Where operation `hash` is in the current chain: (level, applied).
    pub fn included(&self, hash: &str) -> Option<(u64, bool)> {
        let s = self.state.lock();
        s.blocks.iter().find_map(|b| b.ops.iter().find(|o| o.hash == hash).map(|o| (b.level, o.applied)))
    }

    /// Answers every call of `path` with `status` and `body` from now on.
    pub fn override_response(&self, path: &str, status: u16, body: &str) {
        self.state.lock().overrides.insert(path.to_string(), (status, body.to_string()));
    }

    /// Replaces the scripted faults.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().faults = faults;
    }
}
