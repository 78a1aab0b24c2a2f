//! End-to-end test helpers: find the `kalima` binary, run its one-shot commands, start real
//! nodes on free ports (killed on drop), and reach the peers the tests need (the `sqlite3`
//! CLI, schemathesis, a throwaway PostgreSQL).
//!
//! Every `kalima` child gets a hermetic environment: inherited `KALIMA_*` variables are
//! removed (except `KALIMA_LOG`), so a node only sees what its test sets. Node output goes
//! to a log file beside the data directory and is printed when a test fails on it.

pub mod cluster;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// How long a node may take to answer `/readyz` after it was spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a log a failure message shows.
const LOG_TAIL: usize = 6000;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate sits inside the workspace").to_path_buf()
}

/// The `kalima` binary: `$KALIMA_BIN`, else `$CARGO_TARGET_DIR/debug/kalima`, else
/// `<workspace>/target/debug/kalima`. Panics with the build command when it is missing.
pub fn kalima_bin() -> PathBuf {
    let path = match std::env::var_os("KALIMA_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .map(|t| if t.is_relative() { workspace_root().join(t) } else { t })
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug").join("kalima")
        }
    };
    assert!(
        path.is_file(),
        "the kalima binary is missing at {}: run `cargo build -p kalima-gateway` \
         (or set KALIMA_BIN; scripts/test does both)",
        path.display()
    );
    path
}

/// A `kalima` command with a hermetic environment plus `env`.
pub fn kalima_command(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(kalima_bin());
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && k.starts_with("KALIMA_")
            && k != "KALIMA_LOG"
        {
            c.env_remove(k);
        }
    }
    c.env("NO_COLOR", "1");
    // Tests run many nodes at once: the MQTT server takes any free port unless a test says otherwise.
    c.env("KALIMA_MQTT__LISTEN", "127.0.0.1:0");
    c.envs(env.iter().copied());
    c.stdin(Stdio::null());
    c
}

/// Runs `kalima ARGS` to completion (hermetic environment plus `env`).
pub async fn kalima<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut c = kalima_command(env);
    c.args(args);
    tokio::process::Command::from(c).output().await.expect("running the kalima binary")
}

/// `kalima verify --dir DIR` (with `env`, e.g. a PostgreSQL storage URL).
pub async fn verify(dir: &Path, env: &[(&str, &str)]) -> Output {
    kalima(&[OsStr::new("verify"), OsStr::new("--dir"), dir.as_os_str()], env).await
}

/// Asserts that `kalima verify` passes on `dir`.
pub async fn assert_verifies(dir: &Path, env: &[(&str, &str)]) {
    let o = verify(dir, env).await;
    assert!(
        o.status.success() && stdout(&o).contains("chain OK"),
        "kalima verify --dir {} failed:\n{}",
        dir.display(),
        describe(&o)
    );
}

/// Stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status, stdout and stderr, for failure messages.
pub fn describe(o: &Output) -> String {
    format!("status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}", o.status, stdout(o), stderr(o))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding 127.0.0.1:0").port()
}

/// An HTTP client that never goes through a proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("building the HTTP client")
}

/// The last `LOG_TAIL` bytes of a file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Copies the files of a data directory (not recursive: a node keeps only files there).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the copy");
    for e in std::fs::read_dir(from).expect("reading the data directory") {
        let e = e.expect("reading a directory entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copying a file");
        }
    }
}

/// A running `kalima up`, killed (SIGKILL) on drop.
pub struct Node {
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
    token: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Node {
    /// `kalima init --dir DIR`; panics unless it succeeds.
    pub async fn init(dir: &Path) {
        let o = kalima(&[OsStr::new("init"), OsStr::new("--dir"), dir.as_os_str()], &[]).await;
        assert!(o.status.success(), "kalima init --dir {} failed:\n{}", dir.display(), describe(&o));
    }

    /// `kalima up --dir DIR` on a free port with `env`; waits for `/readyz`.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Node {
        Self::start_with(dir, &[], env).await
    }

    /// Like [`Node::start`] with extra arguments to `kalima up` (e.g. `--demo`).
    pub async fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Node {
        let log = log_path(dir);
        let http = http_client();
        // The port is free when picked but may be taken before the node binds it: retry then.
        for attempt in 1..=3 {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let mut file = OpenOptions::new().create(true).append(true).open(&log).expect("opening the node log");
            writeln!(
                file,
                "===== kalima up --dir {} {} (KALIMA_API__LISTEN={listen}, attempt {attempt})",
                dir.display(),
                args.join(" ")
            )
            .expect("writing the node log");
            let offset = file.seek(SeekFrom::End(0)).expect("log offset");
            let mut c = kalima_command(env);
            c.arg("up")
                .arg("--dir")
                .arg(dir)
                .args(args)
                .env("KALIMA_API__LISTEN", &listen)
                .stdout(file.try_clone().expect("cloning the log handle"))
                .stderr(file);
            let child = c.spawn().expect("spawning kalima up");
            let mut node = Node {
                child: Some(child),
                dir: dir.to_path_buf(),
                addr: listen.parse().expect("a socket address"),
                token: String::new(),
                log: log.clone(),
                http: http.clone(),
            };
            let started = Instant::now();
            loop {
                if let Some(status) = node.try_wait() {
                    let out = log_from(&log, offset);
                    if out.contains("cannot listen") && attempt < 3 {
                        break;
                    }
                    panic!("kalima up --dir {} exited ({status}) before it was ready:\n{out}", dir.display());
                }
                let ready = http
                    .get(node.url("/readyz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .map(|r| r.status() == StatusCode::OK)
                    .unwrap_or(false);
                if ready {
                    node.token = std::fs::read_to_string(dir.join("admin.token"))
                        .expect("reading DIR/admin.token")
                        .trim()
                        .to_string();
                    return node;
                }
                if started.elapsed() > READY_TIMEOUT {
                    node.kill9_in_place();
                    panic!(
                        "kalima up --dir {} was not ready within {READY_TIMEOUT:?}:\n{}",
                        dir.display(),
                        log_from(&log, offset)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!("the last attempt panics")
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The end of the node's log (every start of this data directory).
    pub fn log(&self) -> String {
        tail(&self.log)
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("waiting for kalima"))
    }

    /// GET with the admin token: status and JSON body (`Null` when the body is not JSON).
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POST JSON with the admin token: status and JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()));
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Writes one value through `POST /api/v1/tx`; panics unless committed. Returns the receipt.
    pub async fn put(&self, address: &str, key: &str, body: Value) -> Value {
        let (status, receipt) =
            self.post_json("/api/v1/tx", &serde_json::json!({ "address": address, "key": key, "body": body })).await;
        assert_eq!(status, StatusCode::OK, "write {address} {key}: {receipt}\n{}", self.log());
        receipt
    }

    /// The current value of `address`/`key` (its `body`), or `None` on 404.
    pub async fn value(&self, address: &str, key: &str) -> Option<Value> {
        let (status, v) = self.get_json(&format!("/api/v1/values?address={address}&key={key}")).await;
        match status {
            StatusCode::OK => Some(v["values"][0]["body"].clone()),
            StatusCode::NOT_FOUND => None,
            s => panic!("GET values {address} {key}: {s} {v}"),
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(mut self) {
        self.kill9_in_place();
    }

    fn kill9_in_place(&mut self) {
        if let Some(mut c) = self.child.take() {
            // std's Child::kill sends SIGKILL on Unix.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit; panics unless the node stops cleanly (exit 0).
    pub async fn stop(mut self) {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                assert!(status.success(), "kalima exited with {status} after SIGTERM:\n{}", self.log());
                return;
            }
            if started.elapsed() > STOP_TIMEOUT {
                self.kill9_in_place();
                panic!("kalima did not stop within {STOP_TIMEOUT:?} of SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9_in_place();
    }
}

/// The log file of the nodes of `dir` (beside it, so copies of the directory leave it out).
pub fn log_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or(OsStr::new("node")).to_os_string();
    name.push(".log");
    dir.with_file_name(name)
}

fn log_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The `sqlite3` CLI; panics with the install command when it is missing.
pub fn sqlite3_bin() -> PathBuf {
    find_on_path("sqlite3")
        .unwrap_or_else(|| panic!("the sqlite3 CLI is missing: run scripts/peers/install (Debian package sqlite3)"))
}

/// Runs `sqlite3 -bail DB SQL`.
pub async fn sqlite3(db: &Path, sql: &str) -> Output {
    tokio::process::Command::new(sqlite3_bin())
        .arg("-bail")
        .arg(db)
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running sqlite3")
}

/// Runs a query with `sqlite3` and returns its trimmed stdout; panics on failure.
pub async fn sqlite3_query(db: &Path, sql: &str) -> String {
    let o = sqlite3(db, sql).await;
    assert!(o.status.success(), "sqlite3 `{sql}` failed:\n{}", describe(&o));
    stdout(&o).trim().to_string()
}

/// The schemathesis CLI: `$KALIMA_PEERS_VENV/bin/st`, the default peers venv, or `st` on PATH;
/// panics with the install command when none exists.
pub fn schemathesis_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("KALIMA_PEERS_VENV") {
        candidates.push(PathBuf::from(v).join("bin/st"));
    }
    let peers = std::env::var_os("KALIMA_PEERS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kalima-peers")));
    if let Some(p) = peers {
        candidates.push(p.join("venv/bin/st"));
    }
    candidates.into_iter().find(|p| p.is_file()).or_else(|| find_on_path("st")).unwrap_or_else(|| {
        panic!(
            "schemathesis (`st`) is missing: run scripts/peers/install \
                 (it installs scripts/peers/requirements.txt into $KALIMA_PEERS_DIR/venv)"
        )
    })
}

/// The Python of the peers venv (`$KALIMA_PEERS_VENV`, else `$KALIMA_PEERS_DIR/venv`, else
/// `~/.cache/kalima-peers/venv`); panics with the install command when it is missing.
pub fn peers_python() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("KALIMA_PEERS_VENV") {
        candidates.push(PathBuf::from(v).join("bin/python"));
    }
    let peers = std::env::var_os("KALIMA_PEERS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kalima-peers")));
    if let Some(p) = peers {
        candidates.push(p.join("venv/bin/python"));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("the peers venv is missing: run scripts/peers/install (it installs scripts/peers/requirements.txt)")
    })
}

/// The pymodbus simulator (`adapters/modbus/tests/peers/modbus_sim.py`) serving Modbus TCP
/// on a free loopback port; killed on drop.
pub struct ModbusSim {
    child: tokio::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl ModbusSim {
    /// Starts it with `registers` (the simulator's `--registers` JSON) and waits for `READY`.
    pub async fn start(registers: &Value) -> ModbusSim {
        use tokio::io::AsyncBufReadExt;
        let addr = format!("127.0.0.1:{}", free_port());
        let script = workspace_root().join("adapters/modbus/tests/peers/modbus_sim.py");
        let mut child = tokio::process::Command::new(peers_python())
            .arg(&script)
            .args(["--tcp", &addr, "--registers", &registers.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("simulator stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(l))) if l.trim() == "READY" => {}
            other => panic!("Modbus simulator on {addr} did not print READY: {other:?}"),
        }
        ModbusSim { child, addr }
    }
}

impl Drop for ModbusSim {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A Mosquitto broker (Debian `mosquitto`) on a free loopback port; killed on drop.
pub struct Mosquitto {
    child: tokio::process::Child,
    /// Its port.
    pub port: u16,
}

impl Mosquitto {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> Mosquitto {
        let port = free_port();
        let bin = find_on_path("mosquitto")
            .or_else(|| Some(PathBuf::from("/usr/sbin/mosquitto")).filter(|p| p.is_file()))
            .unwrap_or_else(|| panic!("mosquitto is missing: run scripts/peers/install"));
        let child = tokio::process::Command::new(bin)
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "mosquitto did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Mosquitto { child, port }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs Python `code` in the peers venv with `args`; panics unless it exits 0; returns stdout.
pub async fn peers_python_run(code: &str, args: &[&str]) -> String {
    let out =
        tokio::process::Command::new(peers_python()).arg("-c").arg(code).args(args).output().await.expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `KALIMA_TEST_PG_URL`; panics with the command that starts a throwaway server when unset.
pub fn pg_url() -> String {
    match std::env::var("KALIMA_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "KALIMA_TEST_PG_URL is not set: start a throwaway PostgreSQL with \
             `eval \"$(scripts/peers/postgres start)\"` (scripts/test does it for you)"
        ),
    }
}

/// `url` with its database name replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh PostgreSQL database on the `KALIMA_TEST_PG_URL` server, dropped on [`PgDb::drop_db`].
pub struct PgDb {
    admin_url: String,
    /// Database name.
    pub name: String,
    /// URL of the new database.
    pub url: String,
}

impl PgDb {
    /// Creates a database with a unique name (the test role may CREATEDB).
    pub async fn create(tag: &str) -> PgDb {
        use sqlx::Connection;
        let admin_url = pg_url();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("kalima_e2e_{tag}_{}_{nanos}", std::process::id());
        let mut c = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to KALIMA_TEST_PG_URL ({e}); is the server running? `eval \"$(scripts/peers/postgres start)\"`"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = c.close().await;
        let url = with_database(&admin_url, &name);
        PgDb { admin_url, name, url }
    }

    /// Drops the database (best effort: a failure only leaves it behind on a throwaway server).
    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut c).await;
            let _ = c.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(with_database("postgres://k:k@127.0.0.1:5432/kalima_test", "x"), "postgres://k:k@127.0.0.1:5432/x");
        assert_eq!(
            with_database("postgres://127.0.0.1:5432/a?sslmode=disable", "y"),
            "postgres://127.0.0.1:5432/y?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "z"), "postgres://h/z");
    }

    #[test]
    fn log_sits_beside_the_data_directory() {
        assert_eq!(log_path(Path::new("/tmp/x/data")), Path::new("/tmp/x/data.log"));
    }
}
