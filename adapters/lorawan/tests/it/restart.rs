//! A node restart: OTAA sessions and used DevNonces come back from the sessions file, frame
//! counters come back from the chain, so devices keep working and replays stay refused.

use crate::otaa::open_accept;
use crate::support::{GW1, Harness, METER, TRACKER, config, join_request, keys_of, settle, uplink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_counters_survive_a_restart() {
    let mut h = Harness::start(config(100)).await;
    let mut gw = h.gateway(GW1).await;
    gw.pull().await;

    let join = join_request(METER, "5A5A").await;
    gw.uplink(&join, -70).await;
    let keys = keys_of(&open_accept(&gw.expect_pull_resp().await, METER, "5A5A").await);
    let otaa_old = uplink(keys.clone(), 0, 2, "000000010000").await;
    gw.uplink(&otaa_old, -70).await;
    h.node.wait_fcnt(METER.address, "volume", 0).await;
    let abp_old = uplink(TRACKER, 41, 3, "29").await;
    gw.uplink(&abp_old, -70).await;
    h.node.wait_fcnt(TRACKER.address, "payload", 41).await;

    h.restart().await;
    gw.retarget(h.addr());
    gw.pull().await;

    // Replays of committed frames: refused by the new adapter, which has seen neither.
    gw.uplink(&otaa_old, -70).await;
    gw.uplink(&abp_old, -70).await;

    // The next counters of both devices commit (the OTAA session came back from the file).
    gw.uplink(&uplink(keys.clone(), 1, 2, "000000020000").await, -70).await;
    gw.uplink(&uplink(TRACKER, 42, 3, "2a").await, -70).await;
    h.node.wait_fcnt(METER.address, "volume", 1).await;
    h.node.wait_fcnt(TRACKER.address, "payload", 42).await;
    settle().await;
    assert_eq!(h.node.fcnts(METER.address, "volume").await, [0, 1], "the OTAA replay is refused");
    assert_eq!(h.node.fcnts(TRACKER.address, "payload").await, [41, 42], "the ABP replay is refused");

    // The join request again: its DevNonce was used before the restart. The barrier is an ABP
    // uplink, which a wrongly accepted join could not disturb.
    gw.uplink(&join, -70).await;
    gw.uplink(&uplink(TRACKER, 43, 3, "2b").await, -70).await;
    h.node.wait_fcnt(TRACKER.address, "payload", 43).await;
    settle().await;
    assert!(gw.pull_resps().is_empty(), "a join request with a used DevNonce is not answered after a restart");

    // A fresh DevNonce is answered: the silence above was the DevNonce check, not a missing path.
    gw.uplink(&join_request(METER, "5A5B").await, -70).await;
    let rejoined = keys_of(&open_accept(&gw.expect_pull_resp().await, METER, "5A5B").await);
    gw.uplink(&uplink(rejoined, 0, 2, "000000030000").await, -70).await;
    h.node.wait_fcnt(METER.address, "volume", 0).await;
}
