//! Clusters of real `kalima` masters for the fault tests: directories written by `kalima
//! dev-cluster --init-only`, each master's node link on its own loopback address
//! (127.0.0.1N), and in front of each master a fault-injecting TCP proxy that can cut links
//! by source address (a network partition), plus a write load whose acknowledgements are
//! checked against every master's chain afterwards.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{Node, assert_verifies, describe, free_port, http_client, kalima};

/// Loopback address of master `id`'s node link.
pub fn master_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8))
}

fn master_of(ip: IpAddr) -> Option<u64> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] > 10 => {
            Some(u64::from(v4.octets()[3]) - 10)
        }
        _ => None,
    }
}

/// Relayed connections by the master they come from.
type Conns = Arc<Mutex<Vec<(u64, JoinHandle<()>)>>>;

/// A TCP proxy in front of one master that drops links from chosen masters.
pub struct FaultProxy {
    addr: SocketAddr,
    blocked: Arc<Mutex<HashSet<u64>>>,
    conns: Conns,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let blocked: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let conns: Conns = Arc::default();
        let (b, c) = (blocked.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, from)) = listener.accept().await else { continue };
                let src = master_of(from.ip()).unwrap_or(0);
                let cut = b.lock().expect("proxy lock").contains(&src);
                let h = tokio::spawn(async move {
                    let mut inbound = inbound;
                    if cut {
                        // A partition drops packets: the connection opens, nothing arrives.
                        std::future::pending::<()>().await;
                    }
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    let _ = outbound.shutdown().await;
                });
                c.lock().expect("proxy lock").push((src, h));
            }
        });
        FaultProxy { addr, blocked, conns, task }
    }

    /// Where masters dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every link from `from` (existing ones are cut; new ones open but carry nothing).
    pub fn block(&self, from: u64) {
        self.blocked.lock().expect("proxy lock").insert(from);
        self.close_from(from);
    }

    /// Lets `from` through again, closing only its held connections so it reconnects.
    pub fn unblock(&self, from: u64) {
        self.blocked.lock().expect("proxy lock").remove(&from);
        self.close_from(from);
    }

    /// Closes the relayed connections from `from` (and forgets finished ones).
    fn close_from(&self, from: u64) {
        self.conns.lock().expect("proxy lock").retain(|(src, h)| {
            if *src == from {
                h.abort();
                false
            } else {
                !h.is_finished()
            }
        });
    }

    /// Lets every master through again.
    pub fn heal(&self) {
        self.blocked.lock().expect("proxy lock").clear();
        // Held (blackholed) connections are closed so their dialers reconnect.
        let mut conns = self.conns.lock().expect("proxy lock");
        for (_, h) in conns.drain(..) {
            if !h.is_finished() {
                h.abort();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        for (_, h) in self.conns.lock().map(|mut c| c.drain(..).collect::<Vec<_>>()).unwrap_or_default() {
            h.abort();
        }
    }
}

/// Masters on this machine, each behind its proxy.
pub struct TestCluster {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    /// Running masters by id (`None` while stopped).
    pub masters: BTreeMap<u64, Option<Node>>,
    proxies: BTreeMap<u64, FaultProxy>,
    token: String,
    http: reqwest::Client,
}

/// The fields of `/api/v1/cluster` the tests read.
#[derive(Debug, Clone)]
pub struct Status {
    /// `leader`, `follower`, ...
    pub state: String,
    /// Known leader.
    pub leader: Option<u64>,
    /// Chain height.
    pub height: u64,
    /// Head hash.
    pub head_hash: String,
    /// Raft term.
    pub term: u64,
}

impl TestCluster {
    /// Writes `n` masters with `kalima dev-cluster --init-only`, puts each link behind a
    /// proxy, applies `env` to every master, and starts them all.
    pub async fn start(n: u64, env: &[(&str, &str)]) -> TestCluster {
        Self::start_with_clients(n, env, &[]).await
    }

    /// Like [`TestCluster::start`], allowing client nodes with the link keys `clients`.
    pub async fn start_with_clients(n: u64, env: &[(&str, &str)], clients: &[String]) -> TestCluster {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("cluster");
        let base = 7701u64;
        let out = kalima(
            &["dev-cluster", "--init-only", "--dir", root.to_str().expect("utf-8 path"), "--masters", &n.to_string()],
            &[],
        )
        .await;
        assert!(out.status.success(), "kalima dev-cluster --init-only failed:\n{}", describe(&out));
        let mut listens = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        for id in 1..=n {
            let listen = SocketAddr::new(master_ip(id), free_port());
            proxies.insert(id, FaultProxy::start(listen).await);
            listens.insert(id, listen);
        }
        for id in 1..=n {
            let file = root.join(format!("master-{id}")).join("kalima.toml");
            let mut text = std::fs::read_to_string(&file).expect("reading a master's kalima.toml");
            for j in 1..=n {
                let written = format!("\"127.0.0.1:{}\"", base + j - 1);
                let wanted =
                    if j == id { format!("\"{}\"", listens[&j]) } else { format!("\"{}\"", proxies[&j].addr()) };
                if j == id {
                    // Its own entry in the masters list is dialled by the others: the proxy.
                    text = text.replacen(&format!("listen = {written}"), &format!("listen = {wanted}"), 1);
                    text = text.replace(&format!("addr = {written}"), &format!("addr = \"{}\"", proxies[&j].addr()));
                } else {
                    text = text.replace(&format!("addr = {written}"), &format!("addr = {wanted}"));
                }
            }
            if !clients.is_empty() {
                let list = clients.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ");
                text = text.replacen("role = \"master\"\n", &format!("role = \"master\"\nclients = [{list}]\n"), 1);
            }
            std::fs::write(&file, text).expect("writing a master's kalima.toml");
        }
        let token = std::fs::read_to_string(root.join("master-1").join("admin.token"))
            .expect("reading the admin token")
            .trim()
            .to_string();
        let mut c = TestCluster { _tmp: tmp, root, masters: BTreeMap::new(), proxies, token, http: http_client() };
        let starts = (1..=n).map(|id| {
            let dir = c.dir(id);
            async move { (id, Node::start(&dir, env).await) }
        });
        for (id, node) in futures::future::join_all(starts).await {
            c.masters.insert(id, Some(node));
        }
        c
    }

    /// Data directory of master `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("master-{id}"))
    }

    /// The shared admin token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// API base URLs of the running masters.
    pub fn urls(&self) -> Vec<(u64, String)> {
        self.masters.iter().filter_map(|(id, n)| n.as_ref().map(|n| (*id, n.url("")))).collect()
    }

    /// `/api/v1/cluster` of master `id`, if it answers.
    pub async fn status(&self, id: u64) -> Option<Status> {
        let node = self.masters.get(&id)?.as_ref()?;
        let r = self
            .http
            .get(node.url("/api/v1/cluster"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        Some(Status {
            state: v["state"].as_str()?.to_string(),
            leader: v["leader"].as_u64(),
            height: v["height"].as_u64()?,
            head_hash: v["head_hash"].as_str()?.to_string(),
            term: v["term"].as_u64()?,
        })
    }

    /// Waits until every master in `among` that runs agrees on one leader in `among`, which
    /// says it leads; returns it.
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let mut seen = Vec::new();
            for id in among {
                if let Some(s) = self.status(*id).await {
                    seen.push((*id, s));
                }
            }
            if let Some((_, first)) = seen.first()
                && let Some(l) = first.leader
                && among.contains(&l)
                && seen.iter().all(|(_, s)| s.leader == Some(l))
                && seen.iter().any(|(id, s)| *id == l && s.state == "leader")
            {
                return l;
            }
            assert!(started.elapsed() < timeout, "no leader agreed among {among:?} within {timeout:?}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running master has the same height and head hash, at least
    /// `min_height`; returns them.
    pub async fn wait_converged(&self, min_height: u64, timeout: Duration) -> (u64, String) {
        let started = Instant::now();
        loop {
            let mut seen = Vec::new();
            for (id, n) in &self.masters {
                if n.is_some() {
                    seen.push((*id, self.status(*id).await));
                }
            }
            let heads: HashSet<_> =
                seen.iter().map(|(_, s)| s.as_ref().map(|s| (s.height, s.head_hash.clone()))).collect();
            if heads.len() == 1
                && let Some(Some((h, hash))) = heads.into_iter().next()
                && h >= min_height
            {
                return (h, hash);
            }
            if started.elapsed() >= timeout {
                let logs: Vec<String> = self
                    .masters
                    .iter()
                    .filter_map(|(id, n)| n.as_ref().map(|n| format!("--- master {id}:\n{}", n.log())))
                    .collect();
                panic!("masters did not converge within {timeout:?}: {seen:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// kill -9 master `id`.
    pub fn kill9(&mut self, id: u64) {
        if let Some(n) = self.masters.get_mut(&id).and_then(Option::take) {
            n.kill9();
        }
    }

    /// Stops master `id` with SIGTERM.
    pub async fn stop(&mut self, id: u64) {
        if let Some(n) = self.masters.get_mut(&id).and_then(Option::take) {
            n.stop().await;
        }
    }

    /// Starts master `id` again from its directory (with `env`).
    pub async fn restart(&mut self, id: u64, env: &[(&str, &str)]) {
        let node = Node::start(&self.dir(id), env).await;
        self.masters.insert(id, Some(node));
    }

    /// kill -9 master `id` and deletes its chain and Raft log (keys and config stay), as
    /// when a disk is lost and the node is re-provisioned.
    pub fn wipe(&mut self, id: u64) {
        self.kill9(id);
        for e in std::fs::read_dir(self.dir(id)).expect("listing a master's directory") {
            let p = e.expect("a directory entry").path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.starts_with("kalima.db") || name.starts_with("raft.db") {
                std::fs::remove_file(&p).expect("deleting a database file");
            }
        }
    }

    /// The proxied link address of master `id` (what the others dial).
    pub fn link_addr(&self, id: u64) -> String {
        self.proxies[&id].addr().to_string()
    }

    /// A public key from master `id`'s key files (`link.key` JSON or `node.key` seed).
    pub fn public_key(&self, id: u64, which: &str) -> String {
        let text = std::fs::read_to_string(self.dir(id).join("kalima.toml")).expect("reading kalima.toml");
        // The master's own entry in [[cluster.masters]] holds both of its public keys.
        let entry =
            text.split("[[cluster.masters]]").skip(1).find(|e| e.contains(&format!("id = {id}\n"))).expect("own entry");
        let line = entry.lines().find(|l| l.starts_with(&format!("{which} = "))).expect("key line");
        line.split('"').nth(1).expect("a quoted key").to_string()
    }

    /// Cuts every link between `group` and the other masters, both ways.
    pub fn partition(&self, group: &[u64]) {
        for (id, p) in &self.proxies {
            for other in self.proxies.keys() {
                if group.contains(id) != group.contains(other) {
                    p.block(*other);
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// Every acknowledged write of `acked` is on master `id`'s chain exactly once, in order,
    /// and its current value is the last one.
    pub async fn assert_writes(&self, id: u64, acked: &Acked) {
        let node = self.masters[&id].as_ref().expect("a running master");
        for (writer, counters) in acked {
            let address = format!("/load/w{writer}");
            let mut on_chain: Vec<u64> = Vec::new();
            let mut before: Option<u64> = None;
            loop {
                let mut path = format!("/api/v1/history?address={address}&key=v&limit=1000");
                if let Some(b) = before {
                    path.push_str(&format!("&before={b}"));
                }
                let (status, page) = node.get_json(&path).await;
                assert_eq!(status, StatusCode::OK, "history of {address} on master {id}: {page}");
                for item in page["items"].as_array().expect("history items") {
                    on_chain.push(item["body"].as_u64().expect("a counter body"));
                }
                match page["next_before"].as_u64() {
                    Some(b) => before = Some(b),
                    None => break,
                }
            }
            on_chain.reverse();
            let mut seen = HashSet::new();
            for c in &on_chain {
                assert!(seen.insert(*c), "master {id}: write {c} of writer {writer} is on the chain twice");
            }
            for c in counters {
                assert!(seen.contains(c), "master {id}: acknowledged write {c} of writer {writer} is not on the chain");
            }
            let mut sorted = on_chain.clone();
            sorted.sort_unstable();
            assert_eq!(on_chain, sorted, "master {id}: writer {writer}'s writes are out of order");
            let current = node.value(&address, "v").await;
            assert_eq!(
                current,
                on_chain.last().map(|c| json!(c)),
                "master {id}: memcache of {address} is not the chain's latest"
            );
        }
    }

    /// The checks after every fault: all masters converge on one head (by the hash chain,
    /// the same block at every common height), every acknowledged write is on each chain
    /// exactly once and each memcache holds the chain's latest values; then every master
    /// is stopped and its chain passes `kalima verify`.
    pub async fn check_and_stop(mut self, acked: &Acked) {
        let (height, hash) = self.wait_converged(1, Duration::from_secs(60)).await;
        let ids: Vec<u64> = self.masters.keys().copied().collect();
        for id in &ids {
            self.assert_writes(*id, acked).await;
            let (status, block) =
                self.masters[id].as_ref().expect("running").get_json(&format!("/api/v1/blocks/{height}")).await;
            assert_eq!(status, StatusCode::OK, "block {height} on master {id}: {block}");
            assert_eq!(block["block"]["hash"].as_str(), Some(hash.as_str()), "master {id} forked at height {height}");
        }
        for id in &ids {
            self.stop(*id).await;
        }
        for id in &ids {
            assert_verifies(&self.dir(*id), &[]).await;
        }
    }
}

/// Acknowledged counters per writer.
pub type Acked = BTreeMap<u64, Vec<u64>>;

/// Writers that each put increasing counters to `/load/w<N>` key `v`, retrying a write with
/// the same idempotency key (on any master) until it is acknowledged.
pub struct Load {
    urls: Arc<Mutex<Vec<(u64, String)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<(u64, Vec<u64>)>>,
}

impl Load {
    /// Starts `writers` writers against the masters at `urls`.
    pub fn start(urls: Vec<(u64, String)>, token: &str, writers: u64) -> Load {
        Self::start_writers(urls, token, 0..writers)
    }

    /// Starts the writers numbered `writers` (each writes `/load/w<N>`) against `urls`.
    pub fn start_writers(urls: Vec<(u64, String)>, token: &str, writers: std::ops::Range<u64>) -> Load {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let urls = Arc::new(Mutex::new(urls));
        let tasks = writers
            .map(|w| {
                let rx = rx.clone();
                let urls = urls.clone();
                let token = token.to_string();
                tokio::spawn(async move {
                    let http = http_client();
                    let mut acked = Vec::new();
                    let mut attempt = w as usize;
                    for counter in 0u64.. {
                        loop {
                            if *rx.borrow() {
                                return (w, acked);
                            }
                            let url = {
                                let u = urls.lock().expect("urls lock");
                                u[attempt % u.len()].1.clone()
                            };
                            let body = json!({
                                "address": format!("/load/w{w}"), "key": "v", "body": counter,
                                "idempotency_key": format!("w{w}-{counter}"),
                            });
                            let r = http
                                .post(format!("{url}/api/v1/tx"))
                                .bearer_auth(&token)
                                .json(&body)
                                .timeout(Duration::from_secs(5))
                                .send()
                                .await;
                            match r.map(|r| r.status()) {
                                // 409: an earlier attempt of this very write committed.
                                Ok(s) if s.is_success() || s == StatusCode::CONFLICT => {
                                    acked.push(counter);
                                    break;
                                }
                                _ => {
                                    attempt += 1;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            }
                        }
                    }
                    (w, acked)
                })
            })
            .collect();
        Load { urls, stop, tasks }
    }

    /// Points the writers at `urls` (after masters restarted on new ports).
    pub fn set_urls(&self, urls: Vec<(u64, String)>) {
        if !urls.is_empty() {
            *self.urls.lock().expect("urls lock") = urls;
        }
    }

    /// Stops the writers and returns what was acknowledged.
    pub async fn finish(self) -> Acked {
        let _ = self.stop.send(true);
        let mut out = Acked::new();
        for t in self.tasks {
            let (w, acked) = t.await.expect("a load writer");
            out.insert(w, acked);
        }
        out
    }
}

/// Counts acknowledgements across writers.
pub fn total(acked: &Acked) -> usize {
    acked.values().map(Vec::len).sum()
}

/// Source address of client node links (the proxies know it as "master" 30).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 40);
const CLIENT_SOURCE: u64 = 30;
/// Client logs say what each delivery and sync did, for failures to show.
const CLIENT_ENV: &[(&str, &str)] = &[("KALIMA_LOG", "info,core::client=debug")];

/// A client node (`[cluster] role = "client"`) linked to a [`TestCluster`] through its
/// proxies, writing as its own device and syncing `/load`.
pub struct TestClient {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// The running client (`None` while stopped).
    pub node: Option<Node>,
    /// Token of the local device that writes through the client (`sensor-1`).
    pub sensor_token: String,
    http: reqwest::Client,
}

impl TestClient {
    /// A client's data directory and its link public key (for the masters' allow-list).
    pub async fn prepare() -> (tempfile::TempDir, PathBuf, String) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("client");
        let out = kalima(&["init", "--dir", dir.to_str().expect("utf-8 path")], &[]).await;
        assert!(out.status.success(), "kalima init: {}", describe(&out));
        let out = kalima(&["keys", "link", "--dir", dir.to_str().expect("utf-8 path")], &[]).await;
        assert!(out.status.success(), "kalima keys link: {}", describe(&out));
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(key.len(), 64, "a link public key: {key:?}");
        (tmp, dir, key)
    }

    /// Registers the client's device (`edge-1`, reading `/load`) and a local device
    /// (`sensor-1`, writing `/load`) on the cluster, writes the client's config, and starts it.
    pub async fn start(cluster: &TestCluster, prepared: (tempfile::TempDir, PathBuf, String)) -> TestClient {
        let (tmp, dir, _) = prepared;
        let master = cluster.masters.values().flatten().next().expect("a running master");
        let mut tokens = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for (base, read, write) in [("edge-1", true, false), ("sensor-1", false, true)] {
            // Genesis (which registers the admin) may still be on its way after the election,
            // and a young cluster may change leader once: retry, under a new id when an
            // unanswered attempt did register the device (its token is lost with the answer).
            let started = Instant::now();
            let mut id = base.to_string();
            let dev = loop {
                let (status, dev) = master.post_json("/api/v1/devices", &json!({ "id": id })).await;
                if status.is_success() {
                    break dev;
                }
                if status == StatusCode::CONFLICT {
                    id = format!("{base}-{}", started.elapsed().as_millis());
                }
                assert!(started.elapsed() < Duration::from_secs(15), "registering {id}: {status} {dev}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            tokens.insert(base, dev["token"].as_str().expect("a device token").to_string());
            loop {
                let grant = json!({ "prefix": "/load", "read": read, "write": write });
                let (status, g) = master.post_json(&format!("/api/v1/devices/{id}/grants"), &grant).await;
                if status.is_success() {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(15), "granting {id}: {status} {g}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ids.insert(base, id);
        }
        std::fs::write(dir.join("client.token"), &tokens["edge-1"]).expect("writing client.token");
        let chain_toml = std::fs::read_to_string(cluster.dir(1).join("kalima.toml")).expect("master-1 kalima.toml");
        let chain = chain_toml
            .lines()
            .find_map(|l| l.strip_prefix("chain = "))
            .and_then(|v| v.split('"').nth(1))
            .expect("[node] chain of master 1")
            .to_string();
        let edge = &ids["edge-1"];
        let mut toml = format!(
            "[node]\nchain = \"{chain}\"\n\n[mqtt]\nlisten = \"\"\n\n[client]\ndevice = \"{edge}\"\nbind = \"{CLIENT_IP}\"\nack_wait_ms = 2000\n\n[cluster]\nrole = \"client\"\n"
        );
        for id in cluster.masters.keys() {
            toml.push_str(&format!(
                "\n[[cluster.masters]]\nid = {id}\naddr = \"{}\"\nlink_key = \"{}\"\nnode_key = \"{}\"\n",
                cluster.link_addr(*id),
                cluster.public_key(*id, "link_key"),
                cluster.public_key(*id, "node_key"),
            ));
        }
        std::fs::write(dir.join("kalima.toml"), toml).expect("writing the client's kalima.toml");
        let node = Node::start(&dir, CLIENT_ENV).await;
        TestClient { _tmp: tmp, dir, node: Some(node), sensor_token: tokens["sensor-1"].clone(), http: http_client() }
    }

    /// Token of the client's own device (`edge-1`, reading `/load`).
    pub fn edge_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("client.token")).expect("reading client.token").trim().to_string()
    }

    /// The end of the client's log.
    pub fn log(&self) -> String {
        self.node.as_ref().map(Node::log).unwrap_or_default()
    }

    /// The client's API base URL.
    pub fn url(&self) -> String {
        self.node.as_ref().expect("a running client").url("")
    }

    /// `GET /api/v1/client` (as the local device).
    pub async fn status(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/api/v1/client", self.url()))
            .bearer_auth(&self.sensor_token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("GET /api/v1/client");
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.expect("client status JSON")
    }

    /// Waits until every write appended to the outbox so far has an outcome (writers may
    /// keep appending meanwhile); returns the status then.
    pub async fn wait_delivered(&self, timeout: Duration) -> Value {
        let upto = self.status().await["outbox"]["appended"].as_u64().expect("outbox.appended");
        let started = Instant::now();
        loop {
            let s = self.status().await;
            if s["outbox"]["delivered_seq"].as_u64().unwrap_or(0) >= upto {
                return s;
            }
            assert!(started.elapsed() < timeout, "the outbox was not delivered up to {upto} within {timeout:?}: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The client's current value of `address`/`key` as `edge-1`'s local reader sees it.
    pub async fn value(&self, token: &str, address: &str, key: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/api/v1/values?address={address}&key={key}", self.url()))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET values on the client");
        match r.status() {
            StatusCode::OK => Some(r.json::<Value>().await.expect("values JSON")["values"][0]["body"].clone()),
            StatusCode::NOT_FOUND => None,
            s => panic!("GET values {address} {key} on the client: {s}"),
        }
    }

    /// kill -9 the client.
    pub fn kill9(&mut self) {
        if let Some(n) = self.node.take() {
            n.kill9();
        }
    }

    /// Starts the client again from its directory.
    pub async fn restart(&mut self) {
        self.node = Some(Node::start(&self.dir, CLIENT_ENV).await);
    }

    /// Stops the client with SIGTERM.
    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }
}

impl TestCluster {
    /// Cuts every link of client nodes to every master.
    pub fn cut_clients(&self) {
        for p in self.proxies.values() {
            p.block(CLIENT_SOURCE);
        }
    }

    /// Restores the links of client nodes, leaving the masters' links alone.
    pub fn reconnect_clients(&self) {
        for p in self.proxies.values() {
            p.unblock(CLIENT_SOURCE);
        }
    }
}
