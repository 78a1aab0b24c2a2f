//! The `[cluster]` configuration section (role, masters, timing) and `kalima dev-cluster`.

pub mod dev;

use std::collections::BTreeMap;
use std::time::Duration;

use kalima_core::cluster::{ClusterConfig, LinkTuning, Master, parse_public};
use serde::{Deserialize, Serialize};

/// What this node is in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A node on its own: it orders its own writes.
    #[default]
    Single,
    /// A master: votes, stores the chain, orders writes when it leads.
    Master,
    /// An edge node: no chain; syncs its authorized addresses from the masters and
    /// forwards writes to them through an on-disk outbox (see `[client]`).
    Client,
}

/// How strictly the cluster shape is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Development: 1 or 3 masters are accepted with a warning.
    #[default]
    Dev,
    /// Production: at least 5 masters.
    Production,
}

/// Fewest masters of a production chain (it survives two failures).
pub const PRODUCTION_MASTERS: usize = 5;

/// One `[[cluster.masters]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MasterEntry {
    /// Raft id, unique and never reused.
    pub id: u64,
    /// `host:port` of its node link.
    pub addr: String,
    /// Its link public key (hex, from its `link.key`).
    pub link_key: String,
    /// Its node public key (hex): verify trusts blocks it led and checkpoints it signed.
    pub node_key: String,
}

/// `[cluster]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `single` (default), `master` or `client`.
    pub role: Role,
    /// `dev` or `production`.
    pub mode: Mode,
    /// This master's id.
    pub id: u64,
    /// Where node links are accepted.
    pub listen: String,
    /// Form the cluster from `masters` on first start.
    pub bootstrap: bool,
    /// The masters of the cluster at formation.
    pub masters: Vec<MasterEntry>,
    /// Link public keys of client nodes allowed to connect.
    pub clients: Vec<String>,
    /// Raft heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Raft election timeout (ms; randomised up to twice this).
    pub election_timeout_ms: u64,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// Batches the leader proposes before the oldest is applied.
    pub in_flight_batches: usize,
    /// Link heartbeat interval (ms).
    pub link_heartbeat_ms: u64,
    /// A link silent this long is closed (ms).
    pub link_dead_after_ms: u64,
    /// Each link direction rekeys after this many messages.
    pub rekey_messages: u64,
    /// ...or after this many seconds.
    pub rekey_interval_secs: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let c = ClusterConfig::default();
        let l = LinkTuning::default();
        Self {
            role: Role::Single,
            mode: Mode::Dev,
            id: 1,
            listen: "0.0.0.0:7700".into(),
            bootstrap: true,
            masters: Vec::new(),
            clients: Vec::new(),
            heartbeat_ms: c.heartbeat.as_millis() as u64,
            election_timeout_ms: c.election_timeout.as_millis() as u64,
            snapshot_every: c.snapshot_every,
            in_flight_batches: c.in_flight_batches,
            link_heartbeat_ms: l.heartbeat.as_millis() as u64,
            link_dead_after_ms: l.dead_after.as_millis() as u64,
            rekey_messages: l.rekey_messages,
            rekey_interval_secs: l.rekey_interval.as_secs(),
        }
    }
}

impl ClusterSection {
    /// Problems with this section, all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.role == Role::Client {
            if self.masters.is_empty() {
                errs.push("[cluster] role = \"client\" needs the masters it links to, as [[cluster.masters]]".into());
            }
            for m in &self.masters {
                if let Err(e) = parse_public(&m.link_key) {
                    errs.push(format!("[[cluster.masters]] id {}: {e}", m.id));
                }
            }
            return errs;
        }
        if self.role != Role::Master {
            return errs;
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(format!("[cluster] listen = {:?} is not an IP:port address", self.listen));
        }
        let mut ids = std::collections::BTreeSet::new();
        for m in &self.masters {
            if !ids.insert(m.id) {
                errs.push(format!("[[cluster.masters]] id {} appears twice", m.id));
            }
            if let Err(e) = parse_public(&m.link_key) {
                errs.push(format!("[[cluster.masters]] id {}: {e}", m.id));
            }
            if parse_public(&m.node_key).is_err() {
                errs.push(format!(
                    "[[cluster.masters]] id {}: node_key must be the 64-hex-digit public key of its node.key",
                    m.id
                ));
            }
        }
        for k in &self.clients {
            if let Err(e) = parse_public(k) {
                errs.push(format!("[cluster] clients: {e}"));
            }
        }
        if self.masters.is_empty() {
            errs.push("[cluster] role = \"master\" needs the masters listed as [[cluster.masters]]".into());
        } else if self.mode == Mode::Production && self.masters.len() < PRODUCTION_MASTERS {
            errs.push(format!(
                "[cluster] mode = \"production\" needs at least {PRODUCTION_MASTERS} masters, {} are configured (use mode = \"dev\" to run 1 or 3)",
                self.masters.len()
            ));
        }
        if self.bootstrap && !self.masters.is_empty() && !ids.contains(&self.id) {
            errs.push(format!("[cluster] id {} is not among [[cluster.masters]] (needed to bootstrap)", self.id));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= 2 * self.heartbeat_ms {
            errs.push(
                "[cluster] election_timeout_ms must be more than twice heartbeat_ms (and heartbeat_ms > 0)".into(),
            );
        }
        if self.link_heartbeat_ms == 0 || self.link_dead_after_ms <= 2 * self.link_heartbeat_ms {
            errs.push("[cluster] link_dead_after_ms must be more than twice link_heartbeat_ms".into());
        }
        if self.rekey_messages == 0 || self.rekey_interval_secs == 0 {
            errs.push("[cluster] rekey_messages and rekey_interval_secs must be positive".into());
        }
        errs
    }

    /// The warning to log for a development cluster, if any.
    pub fn warning(&self) -> Option<String> {
        (self.role == Role::Master && self.masters.len() < PRODUCTION_MASTERS).then(|| {
            format!(
                "development cluster of {} master(s): a production chain needs at least {PRODUCTION_MASTERS} to survive two failures",
                self.masters.len()
            )
        })
    }

    /// The core's view of this section (call after [`ClusterSection::problems`] is empty).
    pub fn to_core(&self) -> ClusterConfig {
        let masters: BTreeMap<u64, Master> = self
            .masters
            .iter()
            .map(|m| {
                let master = Master {
                    addr: m.addr.clone(),
                    link_key: m.link_key.to_lowercase(),
                    node_key: m.node_key.to_lowercase(),
                };
                (m.id, master)
            })
            .collect();
        ClusterConfig {
            id: self.id,
            listen: self.listen.clone(),
            masters,
            bootstrap: self.bootstrap,
            clients: self.clients.iter().filter_map(|k| parse_public(k).ok()).collect(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_timeout: Duration::from_millis(self.election_timeout_ms),
            snapshot_every: self.snapshot_every.max(1),
            in_flight_batches: self.in_flight_batches.max(1),
            link: LinkTuning {
                heartbeat: Duration::from_millis(self.link_heartbeat_ms),
                dead_after: Duration::from_millis(self.link_dead_after_ms),
                rekey_messages: self.rekey_messages,
                rekey_interval: Duration::from_secs(self.rekey_interval_secs),
                bind: self
                    .listen
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.ip())
                    .filter(|ip| !ip.is_unspecified()),
                ..LinkTuning::default()
            },
            client_max_body: kalima_core::tx::MAX_BODY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masters(n: u64) -> Vec<MasterEntry> {
        (1..=n)
            .map(|id| MasterEntry {
                id,
                addr: format!("127.0.0.1:{}", 7700 + id),
                link_key: format!("{id:064x}"),
                node_key: format!("{:064x}", id + 100),
            })
            .collect()
    }

    fn master(n: u64, mode: Mode) -> ClusterSection {
        ClusterSection { role: Role::Master, mode, masters: masters(n), ..ClusterSection::default() }
    }

    #[test]
    fn production_needs_five_masters_and_dev_warns_below() {
        let p = master(3, Mode::Production).problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("at least 5 masters, 3 are configured"), "{p:?}");
        assert!(master(5, Mode::Production).problems().is_empty());
        assert!(master(5, Mode::Production).warning().is_none());

        for n in [1, 3] {
            assert!(master(n, Mode::Dev).problems().is_empty());
            assert!(master(n, Mode::Dev).warning().is_some_and(|w| w.contains("at least 5")), "{n} masters");
        }
        // A single node is not a cluster: nothing to check.
        assert!(ClusterSection::default().problems().is_empty());
    }

    #[test]
    fn every_master_problem_is_reported_at_once() {
        let mut c = master(3, Mode::Dev);
        c.id = 9;
        c.listen = "nowhere".into();
        c.masters[1].link_key = "zz".into();
        c.masters[2].node_key = "12".into();
        c.masters.push(c.masters[0].clone());
        c.election_timeout_ms = c.heartbeat_ms;
        let p = c.problems();
        for wanted in [
            "listen",
            "id 1 appears twice",
            "id 2: link public key",
            "id 3: node_key",
            "id 9 is not among",
            "election_timeout_ms",
        ] {
            assert!(p.iter().any(|e| e.contains(wanted)), "missing {wanted:?} in {p:?}");
        }
    }
}
