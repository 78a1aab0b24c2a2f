//! Shared test support: the peers' Python (with pytezos) and the pytezos peer script.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

const INSTALL_HINT: &str = "run scripts/peers/install (it installs pytezos from scripts/peers/requirements.txt into \
                            $KALIMA_PEERS_DIR/venv, default ~/.cache/kalima-peers/venv)";

/// The Python of the peers' virtualenv, with pytezos importable; panics (never skips) with
/// the install command when it is missing.
pub(crate) fn peers_python() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("KALIMA_PEERS_VENV").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(v));
    } else {
        if let Some(d) = std::env::var_os("KALIMA_PEERS_DIR").filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(d).join("venv"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(h).join(".cache/kalima-peers/venv"));
        }
    }
    let tried: Vec<PathBuf> = candidates.iter().map(|v| v.join("bin/python")).collect();
    let python = tried.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("the Tezos tests need the peers' Python virtualenv with pytezos, not found at {tried:?}: {INSTALL_HINT}")
    });
    let ok = Command::new(&python)
        .args(["-c", "import pytezos.operation.forge, pytezos.crypto.key"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pytezos does not import in {}: {INSTALL_HINT}", python.display());
    python
}

/// Runs `tests/peers/tezos_peer.py <mode>` with `request` on stdin; returns its JSON answer.
pub(crate) fn pytezos(mode: &str, request: &Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/tezos_peer.py");
    let mut child = Command::new(peers_python())
        .arg(&script)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the pytezos peer");
    let mut stdin = child.stdin.take().expect("a piped stdin");
    stdin.write_all(request.to_string().as_bytes()).expect("write the request");
    drop(stdin);
    let out = child.wait_with_output().expect("the pytezos peer ends");
    assert!(
        out.status.success(),
        "tezos_peer.py {mode} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("tezos_peer.py {mode} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}
