//! `kalima dev-cluster`: a cluster of masters on this machine, for trying clusters out and
//! for the fault tests. Each master gets its own directory `DIR/master-N` (keys, chain,
//! Raft log, `node.log`), its own API port and node-link port on 127.0.0.1; all share one
//! admin token, so the same token works on every master.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kalima_core::cluster::{LINK_KEY_FILE, LinkKey};
use kalima_core::keys::{NODE_KEY_FILE, NodeKey, write_private};

use crate::config::{ADMIN_TOKEN_FILE, CONFIG_FILE};
use crate::node;

/// Ports and size of a development cluster.
#[derive(Debug, Clone)]
pub struct DevCluster {
    /// Parent directory of the masters' directories.
    pub dir: PathBuf,
    /// Chain name.
    pub chain: String,
    /// Number of masters.
    pub masters: u64,
    /// API port of master 1 (master N listens on `api_port + N - 1`).
    pub api_port: u16,
    /// Node-link port of master 1.
    pub link_port: u16,
}

impl DevCluster {
    /// Directory of master `id`.
    pub fn master_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("master-{id}"))
    }

    /// API address of master `id`.
    pub fn api_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.api_port) + id - 1)
    }

    /// Node-link address of master `id`.
    pub fn link_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.link_port) + id - 1)
    }

    /// Creates the masters' directories that do not exist yet (existing ones are kept as
    /// they are) and returns the admin token.
    pub fn init(&self) -> anyhow::Result<String> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let mut fresh = Vec::new();
        for id in 1..=self.masters {
            let d = self.master_dir(id);
            if node::dir_state(&d) == node::DirState::Empty {
                node::init(&d, &self.chain)?;
                fresh.push(id);
            }
            LinkKey::load_or_create(&d.join(LINK_KEY_FILE))?;
        }
        let token = node::read_admin_token(&self.master_dir(1))?;
        let mut masters = String::new();
        for id in 1..=self.masters {
            let key = LinkKey::load(&self.master_dir(id).join(LINK_KEY_FILE))?;
            let node_key = NodeKey::load(&self.master_dir(id).join(NODE_KEY_FILE))?;
            masters.push_str(&format!(
                "\n[[cluster.masters]]\nid = {id}\naddr = \"{}\"\nlink_key = \"{}\"\nnode_key = \"{}\"\n",
                self.link_addr(id),
                key.public_hex(),
                node_key.public_hex()
            ));
        }
        let mode = if self.masters >= crate::cluster::PRODUCTION_MASTERS as u64 { "production" } else { "dev" };
        for id in fresh {
            let d = self.master_dir(id);
            if id != 1 {
                write_private(&d.join(ADMIN_TOKEN_FILE), format!("{token}\n").as_bytes())?;
            }
            let toml = format!(
                "# Master {id} of a development cluster written by `kalima dev-cluster`.\n\n\
                 [node]\nchain = \"{chain}\"\n\n[api]\nlisten = \"{api}\"\n\n[mqtt]\nlisten = \"\"\n\n\
                 [chain]\ncheckpoint_interval_secs = 60\n\n\
                 [cluster]\nrole = \"master\"\nmode = \"{mode}\"\nid = {id}\nlisten = \"{link}\"\nbootstrap = true\n{masters}",
                chain = self.chain,
                api = self.api_addr(id),
                link = self.link_addr(id),
            );
            std::fs::write(d.join(CONFIG_FILE), toml).with_context(|| format!("writing {}", d.display()))?;
        }
        Ok(token)
    }

    /// Runs every master as a child process of this one until SIGINT/SIGTERM, then stops
    /// them gracefully.
    pub async fn run(&self) -> anyhow::Result<()> {
        let token = self.init()?;
        let exe = std::env::current_exe().context("locating the kalima binary")?;
        let mut children = Vec::new();
        for id in 1..=self.masters {
            children.push(spawn_master(&exe, &self.master_dir(id))?);
        }
        println!("Kalima development cluster: {} masters of chain {:?}", self.masters, self.chain);
        for id in 1..=self.masters {
            println!(
                "  master {id}: http://{}  link {}  log {}",
                self.api_addr(id),
                self.link_addr(id),
                self.master_dir(id).join("node.log").display()
            );
        }
        println!("  admin token (every master): {token}");
        println!(
            "  cluster status: curl -H 'Authorization: Bearer {token}' http://{}/api/v1/cluster",
            self.api_addr(1)
        );
        let stop = node::shutdown_signal();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    for (i, c) in children.iter_mut().enumerate() {
                        if let Ok(Some(status)) = c.try_wait() {
                            tracing::warn!(target: "dev-cluster", master = i + 1, %status, "A master exited; see its node.log.");
                        }
                    }
                }
            }
        }
        for c in &children {
            if let Some(pid) = c.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
        }
        for mut c in children {
            if tokio::time::timeout(Duration::from_secs(20), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
        Ok(())
    }
}

fn spawn_master(exe: &Path, dir: &Path) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .with_context(|| format!("opening {}/node.log", dir.display()))?;
    let err = log.try_clone()?;
    tokio::process::Command::new(exe)
        .arg("up")
        .arg("--dir")
        .arg(dir)
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} up --dir {}", exe.display(), dir.display()))
}
