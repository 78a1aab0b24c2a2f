//! Start-up failures a plant engineer meets first: a port in use, a wrong config file, and
//! the environment the node is started from. Each must be a clear, quick error (or no
//! error at all), never a hang or a half-started node.

use std::path::Path;
use std::time::{Duration, Instant};

use kalima_e2e::{Node, assert_verifies, describe, free_port, kalima_command, stderr};

/// How long a failing `kalima up` may take to exit.
const FAIL_FAST: Duration = Duration::from_secs(10);

/// `kalima up --dir DIR` with `env`, expected to exit on its own within [`FAIL_FAST`].
async fn up_expecting_exit(dir: &Path, env: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let mut c = kalima_command(env);
    c.arg("up").arg("--dir").arg(dir);
    let mut c = tokio::process::Command::from(c);
    c.kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(FAIL_FAST, c.output())
        .await
        .unwrap_or_else(|_| panic!("kalima up --dir {} did not exit within {FAIL_FAST:?}", dir.display()))
        .expect("running kalima up");
    (out, started.elapsed())
}

#[tokio::test]
async fn port_in_use() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("local addr").to_string();
    let (out, took) = up_expecting_exit(&dir, &[("KALIMA_API__LISTEN", &addr)]).await;
    assert!(!out.status.success(), "kalima up succeeded on a taken port:\n{}", describe(&out));
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{}", describe(&out));
    let line = errors[0];
    for want in [addr.as_str(), "[api] listen", "KALIMA_API__LISTEN"] {
        assert!(line.contains(want), "the error line does not name {want:?}: {line}");
    }
    assert!(!dir.join("kalima.db").exists(), "storage was touched before the port conflict was reported");
    eprintln!("port conflict reported in {took:?}: {line}");
    drop(taken);
}

/// A broken `kalima.toml` and what the error must name.
struct ConfigCase {
    name: &'static str,
    /// (text in the default kalima.toml, replacement)
    edits: &'static [(&'static str, &'static str)],
    /// Every one of these must appear in the error.
    named: &'static [&'static str],
}

const CONFIG_CASES: &[ConfigCase] = &[
    ConfigCase {
        name: "two invalid values",
        edits: &[
            ("listen = \"0.0.0.0:8080\"", "listen = \"nowhere\""),
            ("max_commit_txs = 20000", "max_commit_txs = 0"),
        ],
        named: &["[api] listen", "nowhere", "max_commit_txs"],
    },
    ConfigCase {
        name: "two values of the wrong type",
        edits: &[
            ("request_timeout_secs = 30", "request_timeout_secs = \"soon\""),
            ("bus_capacity = 1024", "bus_capacity = \"big\""),
        ],
        named: &["request_timeout_secs", "bus_capacity"],
    },
    ConfigCase {
        name: "a wrong type and an invalid value",
        edits: &[("sensors = 4", "sensors = -1"), ("max_commit_txs = 20000", "max_commit_txs = 0")],
        named: &["sensors", "max_commit_txs"],
    },
];

#[tokio::test]
async fn config_errors_all_at_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for (n, case) in CONFIG_CASES.iter().enumerate() {
        let dir = tmp.path().join(format!("case-{n}"));
        Node::init(&dir).await;
        let file = dir.join("kalima.toml");
        let mut toml = std::fs::read_to_string(&file).expect("reading kalima.toml");
        for (from, to) in case.edits {
            assert!(toml.contains(from), "{}: the default kalima.toml has no `{from}`", case.name);
            toml = toml.replacen(from, to, 1);
        }
        // Should a case be accepted by mistake, the node must not take the real port 8080.
        let listen = format!("listen = \"127.0.0.1:{}\"", free_port());
        toml = toml.replacen("listen = \"0.0.0.0:8080\"", &listen, 1);
        std::fs::write(&file, toml).expect("writing kalima.toml");

        let (out, _) = up_expecting_exit(&dir, &[]).await;
        let err = stderr(&out);
        let missing: Vec<&str> = case.named.iter().copied().filter(|w| !err.contains(w)).collect();
        if out.status.success() || !missing.is_empty() {
            failures.push(format!(
                "{}: expected a non-zero exit naming {:?}; missing {missing:?}:\n{}",
                case.name,
                case.named,
                describe(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Only `KALIMA_<SECTION>__<KEY>` variables are configuration; other `KALIMA_*` variables
/// (scripts/test exports KALIMA_PEERS_DIR, KALIMA_PEERS_VENV, KALIMA_TEST_PG_URL, ...) must
/// not stop the node.
#[tokio::test]
async fn foreign_kalima_env_vars_are_ignored() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let env = [
        ("KALIMA_PEERS_DIR", "/nonexistent/kalima-peers"),
        ("KALIMA_PEERS_VENV", "/nonexistent/kalima-peers/venv"),
        ("KALIMA_TEST_PG_URL", "postgres://kalima:kalima@127.0.0.1:1/kalima_test"),
    ];
    let node = Node::start(&dir, &env).await;
    node.put("/env", "ok", serde_json::json!(true)).await;
    node.stop().await;
    assert_verifies(&dir, &env).await;
}

/// Key material is never replaced: a node configured from the environment only (no
/// kalima.toml) starts on its own keys and data; `init` over a node refuses and leaves every
/// file as it was; a directory that lost its data keys is refused instead of re-initialised.
#[tokio::test]
async fn existing_node_files_are_never_overwritten() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let node = Node::start(&dir, &[]).await;
    node.put("/keep", "v", serde_json::json!(42)).await;
    node.stop().await;
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_default();
    let before: Vec<Vec<u8>> = ["node.key", "data-keys.json", "admin.token"].iter().map(|f| read(f)).collect();

    let o = kalima_e2e::kalima(&[std::ffi::OsStr::new("init"), "--dir".as_ref(), dir.as_os_str()], &[]).await;
    assert!(!o.status.success(), "init over a node must refuse:\n{}", describe(&o));
    assert!(stderr(&o).contains("refusing to overwrite"), "{}", describe(&o));

    std::fs::remove_file(dir.join("kalima.toml")).expect("remove config");
    let node = Node::start(&dir, &[]).await;
    assert_eq!(node.value("/keep", "v").await, Some(serde_json::json!(42)), "{}", node.log());
    node.stop().await;
    let after: Vec<Vec<u8>> = ["node.key", "data-keys.json", "admin.token"].iter().map(|f| read(f)).collect();
    assert_eq!(before, after, "key files changed");

    std::fs::rename(dir.join("data-keys.json"), tmp.path().join("saved-keys.json")).expect("move keys away");
    let (out, _) = up_expecting_exit(&dir, &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(stderr(&out).contains("data-keys.json"), "the error names the missing file:\n{}", describe(&out));
    assert!(!dir.join("data-keys.json").exists(), "a new data key ring was written");
    std::fs::rename(tmp.path().join("saved-keys.json"), dir.join("data-keys.json")).expect("restore keys");
    assert_verifies(&dir, &[]).await;
}

/// A provisioned kalima.toml in an otherwise empty directory is kept by `up`, and the chain
/// name is fixed at genesis: starting under another name is refused with the name to set,
/// while `verify` still checks the chain under its recorded name.
#[tokio::test]
async fn provisioned_config_is_kept_and_the_chain_name_is_fixed_at_genesis() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("kalima.toml"), "[node]\nchain = \"plant-7\"\n").expect("write config");
    let node = Node::start(&dir, &[]).await;
    node.put("/p", "v", serde_json::json!(1)).await;
    let (s, cp) = node.post_json("/api/v1/checkpoints", &serde_json::json!(null)).await;
    assert!(s.is_success(), "{cp}");
    assert_eq!(cp["chain"], serde_json::json!("plant-7"), "the provisioned config was used");
    node.stop().await;
    let config = std::fs::read_to_string(dir.join("kalima.toml")).expect("config");
    assert_eq!(config, "[node]\nchain = \"plant-7\"\n", "the provisioned config was kept");

    let (out, _) = up_expecting_exit(&dir, &[("KALIMA_NODE__CHAIN", "other")]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(stderr(&out).contains("plant-7"), "the error names the recorded chain:\n{}", describe(&out));

    std::fs::remove_file(dir.join("kalima.toml")).expect("remove config");
    assert_verifies(&dir, &[]).await;
}
