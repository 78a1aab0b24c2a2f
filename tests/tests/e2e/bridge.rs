//! The Ethereum bridge through a real `kalima` process and a real anvil node, as an exchange
//! uses it: the relayer configured in `kalima.toml`, the bridge configured and followed over
//! REST, a deposit minted, the node killed -9 in the middle of a second one and restarted
//! (nothing minted twice), a withdrawal released, balances checked on both sides, and the
//! chain verified at the end.

use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use kalima_bridge_ethereum::anvil::{BridgeConfig, TestChain as Anvil};
use kalima_bridge_ethereum::contracts::KlxBridge::KlxBridgeInstance;
use kalima_bridge_ethereum::contracts::KlxToken::KlxTokenInstance;
use kalima_core::keys::NodeKey;
use kalima_core::ledger::{AccountKey, KLX, SignedWithdrawal};
use kalima_e2e::{Node, assert_verifies, describe, kalima, stdout};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

pub(crate) async fn deposit(anvil: &Anvil, token: Address, bridge: Address, amount: u128, to: &SigningKey) -> B256 {
    let provider = anvil.provider_for(&anvil.signer(5));
    let t = KlxTokenInstance::new(token, provider.clone());
    let b = KlxBridgeInstance::new(bridge, provider);
    t.approve(bridge, U256::from(amount)).send().await.expect("approve").get_receipt().await.expect("approve mined");
    let r = b
        .deposit(U256::from(amount), B256::from(AccountKey::of(to).0))
        .send()
        .await
        .expect("deposit")
        .get_receipt()
        .await
        .expect("deposit mined");
    assert!(r.status(), "deposit reverted");
    r.transaction_hash
}

async fn erc20(token: &KlxTokenInstance<alloy::providers::DynProvider>, who: Address) -> u128 {
    u128::try_from(token.balanceOf(who).call().await.expect("balanceOf")).expect("fits")
}

/// Token and bridge on `anvil` with `relayers` and `threshold`; the user (dev account 5)
/// holds 500 KLX.
pub(crate) async fn deploy(
    anvil: &Anvil,
    relayers: Vec<Address>,
    threshold: u64,
) -> (KlxTokenInstance<alloy::providers::DynProvider>, KlxBridgeInstance<alloy::providers::DynProvider>, Address) {
    let token = anvil.deploy_token().await.expect("deploy token");
    let bridge = anvil
        .deploy_bridge(&BridgeConfig {
            token: *token.address(),
            relayers,
            threshold,
            guardian: anvil.signer(9).address(),
            per_tx_cap: U256::from(1_000 * KLX),
            window_cap: U256::from(10_000 * KLX),
            window_seconds: 3600,
        })
        .await
        .expect("deploy bridge");
    let user = anvil.signer(5).address();
    token.mint(user, U256::from(500 * KLX)).send().await.expect("mint").get_receipt().await.expect("mined");
    (token, bridge, user)
}

/// Gives the node in `dir` the relayer `device` with a fresh device key and Ethereum key
/// `eth`, serving `bridge` on `anvil`; returns the device key.
pub(crate) fn add_relayer(
    dir: &std::path::Path,
    device: &str,
    eth: &alloy::signers::local::PrivateKeySigner,
    anvil: &Anvil,
    token: Address,
    bridge: Address,
) -> NodeKey {
    let key = NodeKey::generate();
    key.save(&dir.join("relayer.key")).expect("relayer key");
    std::fs::write(dir.join("relayer-eth.key"), format!("0x{}\n", hex::encode(eth.to_bytes()))).expect("eth key");
    let mut toml = std::fs::read_to_string(dir.join("kalima.toml")).expect("kalima.toml");
    toml.push_str(&format!(
        "\n[bridge]\nrelayer_device = \"{device}\"\nreconcile_interval_ms = 300\n\n[[bridge.chains]]\nname = \"ethereum\"\nchain_id = 31337\nrpc_url = \"{}\"\nbridge = \"{bridge:#x}\"\ntoken = \"{token:#x}\"\npoll_interval_ms = 150\nsubmit_delay_ms = 500\n",
        anvil.endpoint(),
    ));
    std::fs::write(dir.join("kalima.toml"), toml).expect("writing kalima.toml");
    key
}

/// Polls `GET path` until `done` holds for the JSON answer; mines blocks meanwhile so the
/// relayer's finalized head moves.
pub(crate) async fn wait_json(
    node: &Node,
    anvil: &Anvil,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, v) = node.get_json(path).await;
        if status == StatusCode::OK && done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: last {status} {v}\n{}", node.log());
        anvil.mine(8).await.expect("mine");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_bridges_klx_both_ways_through_the_node_and_a_restart_mints_nothing_twice() {
    let anvil = Anvil::spawn(31337);
    let relayer_eth = anvil.signer(1);
    let (token, bridge, user) = deploy(&anvil, vec![relayer_eth.address()], 1).await;

    // The node, with its relayer's keys in the data directory.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let relayer_key = add_relayer(&dir, "relayer-1", &relayer_eth, &anvil, *token.address(), *bridge.address());
    let node = Node::start(&dir, &[]).await;

    // The admin registers the relayer device and configures the bridge (1 of 1 here).
    let (s, v) =
        node.post_json("/api/v1/devices", &json!({ "id": "relayer-1", "public_key": relayer_key.public_hex() })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let config = json!({
        "chain_id": 31337,
        "bridge": format!("{:#x}", bridge.address()),
        "token": format!("{:#x}", token.address()),
        "relayers": [{ "device": "relayer-1", "eth_address": format!("{:#x}", relayer_eth.address()) }],
        "threshold": 1,
        "release_ttl_secs": 3600,
        "max_withdrawal": (1_000 * KLX).to_string(),
    });
    let r = node
        .http()
        .put(node.url("/api/v1/bridge/chains/ethereum"))
        .bearer_auth(node.token())
        .json(&config)
        .send()
        .await
        .expect("PUT bridge");
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap_or_default());
    // A threshold of 0 is refused with a reason.
    let mut bad = config.clone();
    bad["threshold"] = json!(0);
    let r = node.http().put(node.url("/api/v1/bridge/chains/other")).bearer_auth(node.token()).json(&bad).send().await;
    let r = r.expect("PUT bad bridge");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // An exchange, managed by its own device, registers its deposit address.
    let alice = SigningKey::generate(&mut rand::rngs::OsRng);
    let alice_hex = AccountKey::of(&alice).to_hex();
    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": "acme-ops" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let acme_token = v["token"].as_str().expect("device token").to_string();
    let (s, v) = node.post_json("/api/v1/bridge/exchanges", &json!({ "id": "acme", "device": "acme-ops" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let r = node
        .http()
        .post(node.url("/api/v1/bridge/exchanges/acme/addresses"))
        .bearer_auth(&acme_token)
        .json(&json!({ "accounts": [alice_hex] }))
        .send()
        .await
        .expect("add address");
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap_or_default());

    // Deposit: minted once final, and the status endpoint follows it by transaction hash.
    let tx = deposit(&anvil, *token.address(), *bridge.address(), 100 * KLX, &alice).await;
    let (_, v) = node.get_json(&format!("/api/v1/bridge/deposits/ethereum?tx_hash={tx:#x}")).await;
    assert_eq!(v[0]["status"], "awaiting_finality", "{v}");
    let account = format!("/api/v1/klx/accounts/{alice_hex}");
    wait_json(&node, &anvil, &account, "the first mint", |v| v["balance"] == (100 * KLX).to_string()).await;
    let (_, v) = node.get_json(&format!("/api/v1/bridge/deposits/ethereum?tx_hash={tx:#x}")).await;
    assert_eq!(v[0]["status"], "minted", "{v}");
    let record_tx = v[0]["record"]["tx_id"].as_str().expect("record tx id").to_string();
    let (s, proof) = node.get_json(&format!("/api/v1/tx/{record_tx}")).await;
    assert_eq!(s, StatusCode::OK, "the mint record has a proof: {proof}");

    // A second deposit, and the node killed -9 while the relayer works on it.
    deposit(&anvil, *token.address(), *bridge.address(), 25 * KLX, &alice).await;
    anvil.mine(70).await.expect("mine");
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.kill9();
    let node = Node::start(&dir, &[]).await;
    wait_json(&node, &anvil, &account, "the second mint", |v| v["balance"] == (125 * KLX).to_string()).await;
    anvil.mine(100).await.expect("mine");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (_, v) = node.get_json("/api/v1/klx/supply").await;
    assert_eq!(v["minted"], (125 * KLX).to_string(), "minted exactly the two deposits: {v}");
    assert_eq!(erc20(&token, *bridge.address()).await, 125 * KLX);

    // Withdrawal: burned at once, released on Ethereum, reported back.
    let before = erc20(&token, user).await;
    let w = SignedWithdrawal::sign("kalima-dev", &alice, "ethereum", &format!("{user:#x}"), 40 * KLX, 1);
    let (s, v) = node.post_json("/api/v1/bridge/withdrawals", &serde_json::to_value(&w).expect("json")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["withdrawal"]["id"].as_str().expect("withdrawal id").to_string();
    // The same signed withdrawal again is refused (nonce), and so is an overdraft.
    let (s, again) = node.post_json("/api/v1/bridge/withdrawals", &serde_json::to_value(&w).expect("json")).await;
    assert_eq!((s, again["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("bad_nonce")), "{again}");
    let over = SignedWithdrawal::sign("kalima-dev", &alice, "ethereum", &format!("{user:#x}"), 900 * KLX, 2);
    let (s, v) = node.post_json("/api/v1/bridge/withdrawals", &serde_json::to_value(&over).expect("json")).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("insufficient_funds")), "{v}");

    let path = format!("/api/v1/bridge/withdrawals/ethereum/{id}");
    let done = wait_json(&node, &anvil, &path, "the release", |v| v["record"]["status"] == "released").await;
    assert!(done["record"]["release"]["tx_hash"].as_str().is_some_and(|h| h.len() == 66), "{done}");
    assert_eq!(erc20(&token, user).await, before + 40 * KLX, "40 KLX released to the user");
    assert_eq!(erc20(&token, *bridge.address()).await, 85 * KLX);
    let (_, v) = node.get_json(&account).await;
    assert_eq!(v["balance"], (85 * KLX).to_string());

    let (_, chains) = node.get_json("/api/v1/bridge/chains").await;
    let totals = &chains[0]["totals"];
    assert_eq!(
        (totals["minted"].as_str(), totals["burned"].as_str(), totals["released"].as_str()),
        (Some(&*(125 * KLX).to_string()), Some(&*(40 * KLX).to_string()), Some(&*(40 * KLX).to_string())),
        "{chains}"
    );
    // The release is final once the relayer reads 85 locked at its final block.
    let status = wait_json(&node, &anvil, "/api/v1/bridge/status", "a passing conservation check", |v| {
        v["conservation"]["ok"] == true
            && v["conservation"]["circulating"] == (85 * KLX).to_string()
            && v["conservation"]["locked_by_chain"]["ethereum"] == (85 * KLX).to_string()
    })
    .await;
    assert_eq!(status["chains"][0]["halted"], Value::Null);
    let (_, acme) = node.get_json("/api/v1/bridge/exchanges/acme").await;
    assert_eq!(
        (acme["addresses"].as_u64(), acme["deposited"].as_str(), acme["withdrawn"].as_str()),
        (Some(1), Some(&*(125 * KLX).to_string()), Some(&*(40 * KLX).to_string())),
        "{acme}"
    );
    let (_, chains) = node.get_json("/api/v1/bridge/chains").await;
    assert_eq!(chains[0]["locked"], (85 * KLX).to_string(), "locked per chain: {chains}");
    let metrics = node.http().get(node.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    // Every series the bridge alert rules use is exported by a relayer node.
    let rules = std::fs::read_to_string(kalima_e2e::workspace_root().join("dashboards/prometheus-bridge-alerts.yml"))
        .expect("reading the bridge alert rules");
    let used: std::collections::BTreeSet<&str> =
        rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("kalima_")).collect();
    assert!(used.len() >= 4, "the rules name {used:?}");
    for series in used {
        assert!(metrics.contains(series), "the bridge alert rules use {series}, which /metrics does not export");
    }
    node.stop().await;
    assert_verifies(&dir, &[]).await;
}

/// GET on one master, as the admin.
async fn master_json(c: &kalima_e2e::cluster::TestCluster, id: u64, path: &str) -> (StatusCode, Value) {
    c.masters[&id].as_ref().expect("running master").get_json(path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayers_on_three_masters_mint_by_majority_and_keep_bridging_with_one_master_down() {
    use kalima_e2e::cluster::TestCluster;
    let anvil = Anvil::spawn(31337);
    let eth: Vec<_> = (1..=3).map(|i| anvil.signer(i)).collect();
    let (token, bridge, user) = deploy(&anvil, eth.iter().map(|s| s.address()).collect(), 2).await;

    // Each master runs the relayer of one operator: its own device key and Ethereum key.
    let mut c = TestCluster::start(3, &[]).await;
    let mut device_keys = Vec::new();
    for id in 1..=3u64 {
        c.stop(id).await;
        let eth_key = &eth[(id - 1) as usize];
        let key =
            add_relayer(&c.dir(id), &format!("relayer-{id}"), eth_key, &anvil, *token.address(), *bridge.address());
        c.restart(id, &[]).await;
        device_keys.push(key);
    }
    c.wait_leader(&[1, 2, 3], Duration::from_secs(30)).await;
    // Every master holds genesis (and so the admin device) before the admin calls it.
    c.wait_converged(0, Duration::from_secs(60)).await;
    let admin = |id: u64| c.masters[&id].as_ref().expect("running master");
    for (i, key) in device_keys.iter().enumerate() {
        let body = json!({ "id": format!("relayer-{}", i + 1), "public_key": key.public_hex() });
        // Just after the restarts a master may still be reconnecting to the leader: it
        // answers 503 "retry", and a client retries (409 means an earlier try went through).
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (s, v) = admin(1).post_json("/api/v1/devices", &body).await;
            if s == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert!(s == StatusCode::CREATED || s == StatusCode::CONFLICT, "{s} {v}");
            break;
        }
    }
    // Configured through another master: the instruction is ordered by the leader.
    let config = json!({
        "chain_id": 31337,
        "bridge": format!("{:#x}", bridge.address()),
        "token": format!("{:#x}", token.address()),
        "relayers": (1..=3).map(|i| json!({ "device": format!("relayer-{i}"), "eth_address": format!("{:#x}", eth[i - 1].address()) })).collect::<Vec<_>>(),
        "threshold": 2,
        "release_ttl_secs": 3600,
        "max_withdrawal": (1_000 * KLX).to_string(),
    });
    // The same configuration sent again is harmless: retry while master 2 reconnects.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = admin(2)
            .http()
            .put(admin(2).url("/api/v1/bridge/chains/ethereum"))
            .bearer_auth(c.token())
            .json(&config)
            .send()
            .await
            .expect("PUT bridge");
        let status = r.status();
        if status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{}", r.text().await.unwrap_or_default());
        break;
    }

    let alice = SigningKey::generate(&mut rand::rngs::OsRng);
    let account = format!("/api/v1/klx/accounts/{}", AccountKey::of(&alice).to_hex());
    deposit(&anvil, *token.address(), *bridge.address(), 100 * KLX, &alice).await;
    for id in 1..=3 {
        wait_json(admin(id), &anvil, &account, "the mint on every master", |v| v["balance"] == (100 * KLX).to_string())
            .await;
    }
    let (_, rec) = master_json(&c, 1, "/api/v1/bridge/deposits/ethereum/0").await;
    assert!(rec["record"]["votes"].as_object().is_some_and(|v| v.len() >= 2), "minted on a majority: {rec}");

    // One operator down: the other two still mint and release.
    c.kill9(3);
    deposit(&anvil, *token.address(), *bridge.address(), 50 * KLX, &alice).await;
    let n1 = c.masters[&1].as_ref().expect("running");
    wait_json(n1, &anvil, &account, "the mint with one relayer down", |v| v["balance"] == (150 * KLX).to_string())
        .await;
    let before = erc20(&token, user).await;
    let w = SignedWithdrawal::sign("kalima-dev", &alice, "ethereum", &format!("{user:#x}"), 30 * KLX, 1);
    let n2 = c.masters[&2].as_ref().expect("running");
    let (s, v) = n2.post_json("/api/v1/bridge/withdrawals", &serde_json::to_value(&w).expect("json")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["withdrawal"]["id"].as_str().expect("id").to_string();
    wait_json(n1, &anvil, &format!("/api/v1/bridge/withdrawals/ethereum/{id}"), "the release", |v| {
        v["record"]["status"] == "released"
    })
    .await;
    assert_eq!(erc20(&token, user).await, before + 30 * KLX);
    assert_eq!(erc20(&token, *bridge.address()).await, 120 * KLX);

    // The third master comes back and holds the same balances.
    c.restart(3, &[]).await;
    c.wait_converged(1, Duration::from_secs(60)).await;
    for id in 1..=3 {
        let (_, v) = master_json(&c, id, &account).await;
        assert_eq!(v["balance"], (120 * KLX).to_string(), "master {id}: {v}");
        let (_, s) = master_json(&c, id, "/api/v1/klx/supply").await;
        assert_eq!(
            (s["minted"].as_str(), s["burned"].as_str()),
            (Some(&*(150 * KLX).to_string()), Some(&*(30 * KLX).to_string())),
            "master {id}"
        );
    }
    c.check_and_stop(&Default::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_anchors_its_checkpoint_on_demand_and_serves_the_anchor() {
    let anvil = Anvil::spawn(31337);
    let anchor_key = anvil.signer(2);
    let contract = kalima_bridge_ethereum::contracts::KlxAnchor::deploy(anvil.provider(), vec![anchor_key.address()])
        .await
        .expect("deploy KlxAnchor");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    std::fs::write(dir.join("anchor-eth.key"), format!("0x{}\n", hex::encode(anchor_key.to_bytes()))).expect("key");
    let mut toml = std::fs::read_to_string(dir.join("kalima.toml")).expect("kalima.toml");
    toml.push_str(&format!(
        "\n[[anchor.targets]]\nname = \"ethereum\"\nrpc_url = \"{}\"\ncontract = \"{:#x}\"\nconfirmations = 2\n",
        anvil.endpoint(),
        contract.address()
    ));
    std::fs::write(dir.join("kalima.toml"), toml).expect("writing kalima.toml");
    let node = Node::start(&dir, &[]).await;
    let written = node.put("/plant-1/line-1", "temp", json!(21.5)).await;
    let id = written["id"].as_str().expect("transaction id").to_string();

    let (s, v) = node.post_json("/api/v1/anchors", &json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let size = v["tree_size"].as_u64().expect("tree size");
    let anchors = wait_json(&node, &anvil, "/api/v1/anchors", "the anchor", |v| {
        v["anchors"].as_array().is_some_and(|a| a.iter().any(|x| x["tree_size"].as_u64() == Some(size)))
    })
    .await;
    let a = &anchors["anchors"][0];
    // The anchor holds the root of the node's signed checkpoint at that size, on the public chain.
    let (_, cp) = node.get_json("/api/v1/checkpoints/latest").await;
    assert_eq!((cp["tree_size"].as_u64(), &cp["root"]), (Some(size), &a["root"]), "{cp} vs {a}");
    let on_chain = kalima_bridge_ethereum::anchor::read_anchor(
        anvil.endpoint().as_str(),
        &format!("{:#x}", contract.address()),
        a["tx_hash"].as_str().expect("tx hash"),
    )
    .await
    .expect("read the anchor")
    .expect("an Anchored event");
    assert_eq!(
        (on_chain.chain.as_str(), on_chain.tree_size, hex::encode(on_chain.root), on_chain.anchorer),
        ("kalima-dev", size, a["root"].as_str().expect("root").to_string(), anchor_key.address())
    );
    let (_, history) = node.get_json("/api/v1/anchors?target=ethereum").await;
    assert_eq!(history["anchors"].as_array().map(Vec::len), Some(1), "{history}");

    // A receipt of the reading, then checked with the node stopped and only anvil's RPC.
    let (s, receipt) = node.get_json(&format!("/api/v1/tx/{id}/receipt")).await;
    assert_eq!(s, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["checkpoint"]["tree_size"].as_u64(), Some(size), "{receipt}");
    assert_eq!(receipt["anchors"][0]["tx_hash"], a["tx_hash"], "{receipt}");
    let node_key = receipt["checkpoint"]["signatures"][0]["signer"].as_str().expect("signer").to_string();
    node.stop().await;
    assert_verifies(&dir, &[]).await;
    let file = tmp.path().join("receipt.json");
    std::fs::write(&file, receipt.to_string()).expect("receipt file");
    let rpc = format!("ethereum={}", anvil.endpoint());
    let file_arg = file.to_str().expect("utf-8 path");
    let check = |args: Vec<String>| async move {
        let mut all = vec!["verify-receipt".to_string()];
        all.extend(args);
        kalima(&all, &[]).await
    };
    let o = check(vec![
        file_arg.into(),
        "--rpc".into(),
        rpc.clone(),
        "--trust".into(),
        node_key.clone(),
        "--require-anchor".into(),
    ])
    .await;
    let out = stdout(&o);
    assert!(o.status.success() && out.contains("VERIFIED"), "{}", describe(&o));
    assert!(out.contains("verified on the public chain") && out.contains("body: 21.5"), "{out}");

    // Without the public chain, the anchor is reported unchecked, and --require-anchor fails.
    let o = check(vec![file_arg.into(), "--require-anchor".into()]).await;
    assert!(!o.status.success() && stdout(&o).contains("not checked (pass --rpc ethereum=URL)"), "{}", describe(&o));
    // Another signer than the one trusted: refused.
    let o = check(vec![file_arg.into(), "--trust".into(), hex::encode([5u8; 32])]).await;
    assert!(!o.status.success() && stdout(&o).contains("0 trusted signature(s)"), "{}", describe(&o));
    // A forged reading: the bytes no longer hash to the proven leaf.
    let mut forged = receipt.clone();
    let bytes = B64.decode(forged["tx_bytes"].as_str().expect("bytes")).expect("base64");
    let at = bytes.windows(4).position(|w| w == b"21.5").expect("the reading in the bytes");
    let mut bytes = bytes;
    bytes[at] = b'3';
    forged["tx_bytes"] = json!(B64.encode(&bytes));
    std::fs::write(&file, forged.to_string()).expect("receipt file");
    let o = check(vec![file_arg.into(), "--rpc".into(), rpc.clone()]).await;
    assert!(!o.status.success() && stdout(&o).contains("FAILED"), "{}", describe(&o));
    // An anchor checked on another chain than the one it names is refused.
    let other = Anvil::spawn(31338);
    std::fs::write(&file, receipt.to_string()).expect("receipt file");
    let o = check(vec![file_arg.into(), "--rpc".into(), format!("ethereum={}", other.endpoint())]).await;
    assert!(!o.status.success() && stdout(&o).contains("anchor ethereum: "), "{}", describe(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_is_verified_against_anchors_on_ethereum_and_on_a_tezos_stand_in() {
    use kalima_bridge_tezos::standin::{Faults, StandInConfig, StandInOctez};
    let anvil = Anvil::spawn(31337);
    let anchor_key = anvil.signer(2);
    let contract = kalima_bridge_ethereum::contracts::KlxAnchor::deploy(anvil.provider(), vec![anchor_key.address()])
        .await
        .expect("deploy KlxAnchor");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    std::fs::write(dir.join("anchor-eth.key"), format!("0x{}\n", hex::encode(anchor_key.to_bytes()))).expect("key");
    // The node's Tezos key, made first so the stand-in's contract can name it its admin.
    let tezos_key = kalima_bridge_tezos::TezosKey::load_or_create(&dir.join("anchor-tezos.key")).expect("tezos key");
    let tz1 = tezos_key.address_b58();
    let octez = StandInOctez::start(
        StandInConfig { admin: tz1.clone(), accounts: vec![(tz1.clone(), 0)], ..StandInConfig::default() },
        Faults::default(),
    )
    .await
    .expect("the Octez stand-in starts");
    let kt1 = kalima_bridge_tezos::standin::RECORDED_CONTRACT;
    let mut toml = std::fs::read_to_string(dir.join("kalima.toml")).expect("kalima.toml");
    toml.push_str(&format!(
        "\n[[anchor.targets]]\nname = \"ethereum\"\nrpc_url = \"{}\"\ncontract = \"{:#x}\"\nconfirmations = 2\n\n[[anchor.tezos]]\nname = \"tezos\"\nrpc_url = \"{}\"\ncontract = \"{kt1}\"\nconfirmations = 2\npoll_interval_ms = 50\n",
        anvil.endpoint(),
        contract.address(),
        octez.url,
    ));
    std::fs::write(dir.join("kalima.toml"), toml).expect("writing kalima.toml");
    let node = Node::start(&dir, &[]).await;
    let written = node.put("/plant-1/line-1", "temp", json!(21.5)).await;
    let id = written["id"].as_str().expect("transaction id").to_string();

    let (s, v) = node.post_json("/api/v1/anchors", &json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let size = v["tree_size"].as_u64().expect("tree size");
    let anchors = wait_json(&node, &anvil, "/api/v1/anchors", "both anchors", |v| {
        v["anchors"].as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["tree_size"].as_u64() == Some(size)))
    })
    .await;
    let tezos = anchors["anchors"].as_array().and_then(|a| a.iter().find(|x| x["kind"] == "tezos")).expect("tezos");
    assert_eq!(tezos["contract"], kt1, "{tezos}");
    assert!(tezos["tx_hash"].as_str().is_some_and(|h| h.starts_with('o')), "an operation hash: {tezos}");
    assert!(octez.problems().is_empty(), "the stand-in found faults in what it received: {:?}", octez.problems());

    // One receipt, anchored on both, checked against both public chains with the node stopped.
    let (s, receipt) = node.get_json(&format!("/api/v1/tx/{id}/receipt")).await;
    assert_eq!(s, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["anchors"].as_array().map(Vec::len), Some(2), "{receipt}");
    node.stop().await;
    let file = tmp.path().join("receipt.json");
    std::fs::write(&file, receipt.to_string()).expect("receipt file");
    let args = [
        "verify-receipt".to_string(),
        file.to_str().expect("path").into(),
        "--rpc".into(),
        format!("ethereum={}", anvil.endpoint()),
        "--rpc".into(),
        format!("tezos={}", octez.url),
        "--require-anchor".into(),
    ];
    let o = kalima(&args, &[]).await;
    let out = stdout(&o);
    assert!(o.status.success() && out.contains("VERIFIED"), "{}", describe(&o));
    assert_eq!(out.matches("verified on the public chain").count(), 2, "{out}");
    assert!(out.contains(&format!("anchored by {tz1}")), "{out}");

    // A receipt whose Tezos anchor names another operation fails on that anchor.
    let mut forged = receipt.clone();
    if let Some(a) = forged["anchors"].as_array_mut().and_then(|a| a.iter_mut().find(|x| x["kind"] == "tezos")) {
        a["tx_hash"] = json!("ooZ7y2yDxT9MJ3jM8fe2tGgYoMN1y6dr5QgCZr8Gum2xz9Vabc4");
    }
    std::fs::write(&file, forged.to_string()).expect("receipt file");
    let mut args = args.to_vec();
    args.truncate(6);
    let o = kalima(&args, &[]).await;
    assert!(!o.status.success() && stdout(&o).contains("anchor tezos"), "{}", describe(&o));
}
