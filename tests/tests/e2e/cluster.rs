//! Fault tests of a five-master cluster: separate `kalima` processes on loopback, each node
//! link behind a fault-injecting proxy, under a sustained write load from several writers.
//! After each fault: every master converges on one head (no fork), every acknowledged write
//! is on every chain exactly once, every memcache equals its chain's latest values, and every
//! chain passes `kalima verify`.

use std::time::{Duration, Instant};

use kalima_e2e::cluster::{Load, TestClient, TestCluster, total};

const MASTERS: u64 = 5;
const WRITERS: u64 = 4;
/// Elections start 0.45-0.6 s after the leader falls silent: "a few election timeouts".
const NEW_LEADER_WITHIN: Duration = Duration::from_secs(5);

/// Lets the load run for `d`.
async fn load_for(d: Duration) {
    tokio::time::sleep(d).await;
}

fn others(all: u64, but: u64) -> Vec<u64> {
    (1..=all).filter(|i| *i != but).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_elects_a_new_one_and_writes_resume() {
    let mut c = TestCluster::start(MASTERS, &[]).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    let leader = c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let load = Load::start(c.urls(), c.token(), WRITERS);
    load_for(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    c.kill9(leader);
    load.set_urls(c.urls());
    let rest = others(MASTERS, leader);
    let new_leader = c.wait_leader(&rest, NEW_LEADER_WITHIN).await;
    assert_ne!(new_leader, leader);
    eprintln!("new leader {new_leader} after {:?}", killed_at.elapsed());
    let before = c.status(new_leader).await.map(|s| s.height).unwrap_or(0);
    // Writes resume: the chain grows under the new leader.
    let resumed = Instant::now();
    loop {
        let h = c.status(new_leader).await.map(|s| s.height).unwrap_or(0);
        if h > before + 5 {
            break;
        }
        assert!(resumed.elapsed() < Duration::from_secs(10), "writes did not resume under master {new_leader}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart(leader, &[]).await;
    load.set_urls(c.urls());
    load_for(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    assert!(total(&acked) > 50, "the load barely ran: {acked:?}");
    c.check_and_stop(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_partitioned_into_a_minority_commits_nothing_and_converges_after_healing() {
    let c = TestCluster::start(MASTERS, &[]).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    let leader = c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let load = Load::start(c.urls(), c.token(), WRITERS);
    load_for(Duration::from_secs(2)).await;

    // The old leader and one follower on one side, three masters on the other.
    let minority = vec![leader, others(MASTERS, leader)[0]];
    let majority: Vec<u64> = all.iter().copied().filter(|i| !minority.contains(i)).collect();
    c.partition(&minority);
    // Clients fail over to masters that answer; the minority gets only the probe below.
    load.set_urls(c.urls().into_iter().filter(|(id, _)| majority.contains(id)).collect());
    let minority_height = {
        // Whatever the minority had committed before the cut may still be applied: wait
        // for it to settle, then it must not move.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.status(leader).await.map(|s| s.height).unwrap_or(0)
    };
    let new_leader = c.wait_leader(&majority, NEW_LEADER_WITHIN).await;
    assert!(majority.contains(&new_leader));
    // A write sent to the old leader is never acknowledged while it is cut off.
    let old_view = c.status(leader).await;
    let old = c.masters[&leader].as_ref().expect("the old leader runs");
    let probe = old
        .http()
        .post(old.url("/api/v1/tx"))
        .bearer_auth(c.token())
        .json(&serde_json::json!({ "address": "/probe", "key": "minority", "body": 1, "idempotency_key": "probe-1" }))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(!probe.is_ok_and(|r| r.status().is_success()), "the cut-off leader acknowledged a write");
    // The majority goes on.
    let waited = Instant::now();
    loop {
        let h = c.status(new_leader).await.map(|s| s.height).unwrap_or(0);
        if h > minority_height + 5 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the majority did not continue ({h} <= {minority_height} + 5)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in &minority {
        let h = c.status(*m).await.map(|s| s.height).unwrap_or(0);
        assert!(h <= minority_height, "master {m} in the minority committed (height {h} > {minority_height})");
    }
    let majority_height = c.status(new_leader).await.map(|s| s.height).unwrap_or(0);

    c.heal();
    load.set_urls(c.urls());
    c.wait_converged(majority_height, Duration::from_secs(30)).await;
    // The probe's entry was never committed: the healed minority dropped it.
    let (_, v) = c.masters[&leader].as_ref().expect("runs").get_json("/api/v1/values?address=/probe").await;
    assert_eq!(
        v["values"].as_array().map(Vec::len),
        Some(0),
        "the minority's write reached the chain: {v}\nold leader {leader} at the probe: {old_view:?}\n{}",
        c.masters[&leader].as_ref().expect("runs").log()
    );
    let acked = load.finish().await;
    assert!(total(&acked) > 50, "the load barely ran: {acked:?}");
    c.check_and_stop(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_master_under_load() {
    let mut c = TestCluster::start(MASTERS, &[]).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let load = Load::start(c.urls(), c.token(), WRITERS);
    load_for(Duration::from_secs(1)).await;
    for id in 1..=MASTERS {
        c.stop(id).await;
        load.set_urls(c.urls());
        load_for(Duration::from_millis(500)).await;
        c.restart(id, &[]).await;
        load.set_urls(c.urls());
        // The next master goes down only once this one is back in the cluster and has
        // caught up with what the leader had when it came back.
        let leader = c.wait_leader(&all, Duration::from_secs(15)).await;
        let target = c.status(leader).await.map(|s| s.height).unwrap_or(0);
        let waited = Instant::now();
        loop {
            let h = c.status(id).await.map(|s| s.height).unwrap_or(0);
            if h >= target && target > 0 {
                break;
            }
            assert!(waited.elapsed() < Duration::from_secs(20), "master {id} did not catch up ({h} < {target})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    load_for(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    assert!(total(&acked) > 50, "the load barely ran: {acked:?}");
    c.check_and_stop(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_master_re_added_catches_up_from_a_snapshot() {
    // Small snapshots, so the log the wiped master would need is long purged.
    let env = [("KALIMA_CLUSTER__SNAPSHOT_EVERY", "20")];
    let mut c = TestCluster::start(MASTERS, &env).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    let leader = c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let wiped = others(MASTERS, leader)[0];
    let load = Load::start(c.urls(), c.token(), WRITERS);
    load_for(Duration::from_secs(2)).await;

    // Out of the membership, then its disk is lost.
    let admin = c.masters[&leader].as_ref().expect("leader runs").http().clone();
    let url = |c: &TestCluster, id: u64| c.masters[&id].as_ref().expect("runs").url("");
    let r = admin
        .delete(format!("{}/api/v1/cluster/members/{wiped}", url(&c, leader)))
        .bearer_auth(c.token())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "removing master {wiped}: {}", r.text().await.unwrap_or_default());
    c.wipe(wiped);
    load.set_urls(c.urls());
    load_for(Duration::from_secs(2)).await;

    // Re-provisioned under a new id, empty, not bootstrapping; added through any master.
    let new_id = MASTERS + 1;
    let id_env = new_id.to_string();
    c.restart(wiped, &[("KALIMA_CLUSTER__ID", id_env.as_str()), ("KALIMA_CLUSTER__BOOTSTRAP", "false"), env[0]]).await;
    let via = others(MASTERS, wiped)[1];
    let body = serde_json::json!({
        "id": new_id,
        "addr": c.link_addr(wiped),
        "link_key": c.public_key(wiped, "link_key"),
        "node_key": c.public_key(wiped, "node_key"),
    });
    let r = admin
        .post(format!("{}/api/v1/cluster/members", url(&c, via)))
        .bearer_auth(c.token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "adding master {new_id}: {status} {text}");
    let members: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(members["members"][new_id.to_string()]["voter"], true, "{members}");
    assert!(members["members"].get(wiped.to_string()).is_none(), "{members}");
    load.set_urls(c.urls());
    load_for(Duration::from_secs(1)).await;

    // It came back through a snapshot, not by replaying the log from the start.
    let metrics =
        c.masters[&wiped].as_ref().unwrap().http().get(format!("{}/metrics", url(&c, wiped))).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let installed = metrics
        .lines()
        .find(|l| l.starts_with("kalima_cluster_snapshots_installed_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(installed >= 1.0, "master {new_id} did not install a snapshot:\n{metrics}");

    // Both changes are on the chain.
    let (_, history) =
        c.masters[&wiped].as_ref().unwrap().get_json("/api/v1/history?address=/_kalima/cluster&key=members").await;
    assert_eq!(history["items"].as_array().map(Vec::len), Some(2), "{history}");

    let acked = load.finish().await;
    assert!(total(&acked) > 50, "the load barely ran: {acked:?}");
    c.check_and_stop(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_node_cut_off_keeps_writing_to_its_outbox_and_delivers_it_once_in_order() {
    let prepared = TestClient::prepare().await;
    let c = TestCluster::start_with_clients(MASTERS, &[], std::slice::from_ref(&prepared.2)).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let mut client = TestClient::start(&c, prepared).await;
    let edge_token = client.edge_token();
    // Writers on the masters and, through the client, a local device of the client.
    let masters_load = Load::start(c.urls(), c.token(), 2);
    let client_load = Load::start_writers(vec![(0, client.url())], &client.sensor_token, 100..102);
    load_for(Duration::from_secs(2)).await;
    // A young cluster may change leader once; deliveries resume once it settles.
    let started = Instant::now();
    loop {
        let s = client.status().await;
        if s["online"] == true && s["outbox"]["delivered_seq"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the client does not deliver while the masters are reachable: {s}\n{}",
            client.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Cut off: local writes go on, into the outbox; a write made meanwhile on a master is
    // synced once the client is back.
    c.cut_clients();
    let started = Instant::now();
    let before = loop {
        // Giving up on a silent master takes its connect timeout (3 s).
        let s = client.status().await;
        if s["online"] == false {
            break s["outbox"]["appended"].as_u64().unwrap_or(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the client did not notice the cut: {s}\n{}",
            client.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    load_for(Duration::from_secs(3)).await;
    let s = client.status().await;
    let queued = s["outbox"]["appended"].as_u64().unwrap_or(0) - before;
    assert!(
        queued > 10 && s["outbox"]["pending"].as_u64().unwrap_or(0) >= queued,
        "writes were not queued while cut off ({queued} appended): {s}\n{}",
        client.log()
    );
    let leader = c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    c.masters[&leader].as_ref().expect("leader runs").put("/load/remote", "x", serde_json::json!(42)).await;
    // Reads of the synced addresses are served from the client's memcache meanwhile.
    assert!(client.value(&edge_token, "/load/w100", "v").await.is_some(), "nothing synced before the cut");
    c.reconnect_clients();
    let s = client.wait_delivered(Duration::from_secs(90)).await;
    assert_eq!(s["refused"].as_array().map(Vec::len), Some(0), "{s}");

    // Cut off again, then killed -9 right after reconnecting, in the middle of delivering:
    // the restarted client delivers the rest, and nothing twice.
    c.cut_clients();
    load_for(Duration::from_secs(3)).await;
    c.reconnect_clients();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.kill9();
    client.restart().await;
    client_load.set_urls(vec![(0, client.url())]);
    load_for(Duration::from_secs(1)).await;

    let mut acked = masters_load.finish().await;
    let from_client = client_load.finish().await;
    assert!(total(&from_client) > 50, "the client's writers barely ran: {from_client:?}");
    let s = client.wait_delivered(Duration::from_secs(90)).await;
    assert_eq!(s["outbox"]["pending"], 0, "{s}");
    assert_eq!(s["refused"].as_array().map(Vec::len), Some(0), "{s}");
    acked.extend(from_client.clone());

    // The client's memcache equals the chain's latest values of what it syncs.
    let master = c.masters.values().flatten().next().expect("a running master");
    let mut addresses: Vec<(String, String)> = acked.keys().map(|w| (format!("/load/w{w}"), "v".to_string())).collect();
    addresses.push(("/load/remote".into(), "x".into()));
    let started = Instant::now();
    for (address, key) in &addresses {
        let on_chain = master.value(address, key).await;
        assert!(on_chain.is_some(), "{address} has no value on the chain");
        loop {
            let local = client.value(&edge_token, address, key).await;
            if local == on_chain {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "client memcache {address}/{key} = {local:?}, chain = {on_chain:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    client.stop().await;
    c.check_and_stop(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_co_signed_by_a_quorum_of_masters() {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    let c = TestCluster::start(MASTERS, &[("KALIMA_CHAIN__CHECKPOINT_INTERVAL_SECS", "1")]).await;
    let all: Vec<u64> = (1..=MASTERS).collect();
    let leader = c.wait_leader(&all, NEW_LEADER_WITHIN).await;
    let load = Load::start(c.urls(), c.token(), 2);
    load_for(Duration::from_secs(1)).await;
    let node_keys: Vec<String> = all.iter().map(|id| c.public_key(*id, "node_key")).collect();
    // Read from a follower: the co-signed checkpoint is on every chain.
    let follower = others(MASTERS, leader)[0];
    let node = c.masters[&follower].as_ref().expect("runs");
    let started = Instant::now();
    let cp = loop {
        let (status, cp) = node.get_json("/api/v1/checkpoints/latest").await;
        if status.is_success() && cp["signatures"].as_array().is_some_and(|s| s.len() > 1) {
            break cp;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no co-signed checkpoint: {cp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = cp["signed_text"].as_str().expect("signed text");
    assert!(text.contains(&format!("\n{}\n", cp["tree_size"])), "the text names the tree size: {text}");
    let mut signers = std::collections::BTreeSet::new();
    for s in cp["signatures"].as_array().expect("signatures") {
        let signer = s["signer"].as_str().expect("signer");
        assert!(node_keys.iter().any(|k| k == signer), "signed by {signer}, not a master");
        let key: [u8; 32] = hex::decode(signer).unwrap().try_into().unwrap();
        let sig: [u8; 64] = hex::decode(s["signature"].as_str().unwrap()).unwrap().try_into().unwrap();
        // Each signature checks on its own, with nothing but the text and the key.
        VerifyingKey::from_bytes(&key).unwrap().verify(text.as_bytes(), &Signature::from_bytes(&sig)).unwrap();
        signers.insert(signer.to_string());
    }
    assert!(signers.len() as u64 > MASTERS / 2, "{} distinct signers is not a quorum of {MASTERS}", signers.len());
    // The checkpoint's root is the root of the block it names, on this master's chain.
    let (_, block) = node.get_json(&format!("/api/v1/blocks/{}", cp["height"])).await;
    assert_eq!(block["block"]["merkle_root"], cp["root"], "{block}");
    assert_eq!(block["block"]["tree_size"], cp["tree_size"], "{block}");
    let acked = load.finish().await;
    c.check_and_stop(&acked).await;
}
