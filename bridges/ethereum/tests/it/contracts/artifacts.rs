//! The committed contract artifacts: `build.js --check` passes on the sources as they are and
//! catches a changed source.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `node <script> --check` in `dir`, failing with the install hint when node is missing.
fn run_check(dir: &Path, script: &Path) -> Output {
    let output = Command::new("node")
        .arg(script)
        .arg("--check")
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}); run scripts/peers/install"));
    assert_ne!(
        output.status.code(),
        Some(2),
        "build.js could not compile; run scripts/peers/install\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn artifacts_are_up_to_date() {
    let root = workspace_root();
    let output = run_check(&root, Path::new("bridges/ethereum/contracts/build.js"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn artifact_check_detects_a_changed_source() {
    let contracts = workspace_root().join("bridges/ethereum/contracts");
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("contracts");
    copy_tree(&contracts, &copy);

    // Unchanged sources in another directory still match: the artifacts do not depend on
    // where the repository lives.
    let output = run_check(tmp.path(), &copy.join("build.js"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let source = std::fs::read_to_string(copy.join("KlxBridge.sol")).expect("read source");
    let changed = source.replace(r#"EIP712("KlxBridge", "1")"#, r#"EIP712("KlxBridge", "2")"#);
    assert_ne!(source, changed, "the domain version literal moved; update this test");
    std::fs::write(copy.join("KlxBridge.sol"), changed).expect("write source");

    let output = run_check(tmp.path(), &copy.join("build.js"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("KlxBridge.json"), "{stderr}");
    assert!(!stderr.contains("KlxToken.json"), "{stderr}");
    assert!(stderr.contains("node bridges/ethereum/contracts/build.js"), "{stderr}");
}

/// Copies every file below `from` into `to` (the contracts directory is small and flat).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list contracts") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("file name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy contracts");
        }
    }
}
