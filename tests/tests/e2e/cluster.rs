//! Fault tests of a five-master cluster: separate `kalima` processes on loopback, each node
//! link behind a fault-injecting proxy, under a sustained write load from several writers.
//! After each fault: every master converges on one head (no fork), every acknowledged write
//! is on every chain exactly once, every memcache equals its chain's latest values, and every
//! chain passes `kalima verify`.

use std::time::{Duration, Instant};

use kalima_e2e::cluster::{Load, TestCluster, total};

const MASTERS: u64 = 5;
const WRITERS: u64 = 4;
/// Election timeout 400-800 ms: "a few election timeouts".
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
    let minority_height = {
        // Whatever the minority had committed before the cut may still be applied: wait
        // for it to settle, then it must not move.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.status(leader).await.map(|s| s.height).unwrap_or(0)
    };
    let new_leader = c.wait_leader(&majority, NEW_LEADER_WITHIN).await;
    assert!(majority.contains(&new_leader));
    load_for(Duration::from_secs(3)).await;
    for m in &minority {
        let h = c.status(*m).await.map(|s| s.height).unwrap_or(0);
        assert!(h <= minority_height, "master {m} in the minority committed (height {h} > {minority_height})");
    }
    let majority_height = c.status(new_leader).await.map(|s| s.height).unwrap_or(0);
    assert!(majority_height > minority_height, "the majority did not continue ({majority_height})");

    c.heal();
    c.wait_converged(majority_height, Duration::from_secs(30)).await;
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
        // The next master goes down only once this one is back in the cluster.
        c.wait_leader(&all, Duration::from_secs(15)).await;
        let h = c.status(id).await.map(|s| s.height).unwrap_or(0);
        assert!(h > 0, "master {id} did not rejoin");
    }
    load_for(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    assert!(total(&acked) > 50, "the load barely ran: {acked:?}");
    c.check_and_stop(&acked).await;
}
