//! Deliveries (DESIGN.md invariant 4 on the MQTT interface): committed puts are republished on
//! `kalima/out/<address>/<key>` to subscribers whose filter matches AND who hold a read grant
//! on the address; nothing else reaches them. A later, readable put serves as the marker
//! that ends the window in which something unreadable could have shown up (deliveries of
//! one subscriber keep commit order), so the tests wait for behaviour, not for fixed times.

use crate::support::{PyClient, Received, Setup, V, VERSIONS, rc};

fn topics(m: &[Received]) -> Vec<&str> {
    m.iter().map(|r| r.topic.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_receive_only_committed_puts_they_may_read() {
    for v in VERSIONS {
        let s = Setup::start().await;
        s.node.register("writer", &[("/plant-1", false, true), ("/plant-2", false, true)]).await;
        s.node.register("line2-reader", &[("/plant-1/line-2", true, false)]).await;
        s.node.register("line3-reader", &[("/plant-1/line-3", true, false)]).await;
        s.node.register("blind", &[("/plant-1", false, true)]).await;

        let mut r2 = s.client(v, "line2-reader").await;
        assert_eq!(r2.subscribe(&[("kalima/out/plant-1/#", 1)]).await, vec![1], "{v:?}");
        let mut r3 = s.client(v, "line3-reader").await;
        assert_eq!(r3.subscribe(&[("kalima/out/#", 0)]).await, vec![0], "{v:?}");
        // A write-only device may subscribe, but reads nothing.
        let mut blind = s.client(v, "blind").await;
        assert_eq!(blind.subscribe(&[("kalima/out/#", 1)]).await, vec![1], "{v:?}");

        let mut w = s.client(v, "writer").await;
        for (topic, body) in [
            ("kalima/plant-1/line-3/temp", "L3"),
            ("kalima/plant-2/line-2/temp", "P2"),
            ("kalima/plant-1/line-2/temp", "21.5"),
            ("kalima/plant-1/line-2x/temp", "prefix-lookalike"),
            ("kalima/plant-1/line-2/pressure", "3.2"),
            ("kalima/plant-1/line-3/marker", "end-3"),
            ("kalima/plant-1/line-2/marker", "end-2"),
        ] {
            assert_eq!(w.put(topic, body.as_bytes(), 1, &[]).await, rc::SUCCESS, "{v:?} {topic}");
        }
        // A reader's own puts are not needed for this; the writer's are delivered.
        let m = r2.wait_message("kalima/out/plant-1/line-2/marker").await;
        assert_eq!(m.payload, b"end-2");
        let got = r2.messages();
        assert_eq!(
            topics(&got),
            vec![
                "kalima/out/plant-1/line-2/temp",
                "kalima/out/plant-1/line-2/pressure",
                "kalima/out/plant-1/line-2/marker"
            ],
            "{v:?}: line2-reader"
        );
        assert_eq!(got[0].payload, b"21.5", "{v:?}: the payload is the body");
        assert_eq!(got[0].qos, 1, "{v:?}: delivered at the granted QoS");
        r3.wait_message("kalima/out/plant-1/line-3/marker").await;
        assert_eq!(
            topics(&r3.messages()),
            vec!["kalima/out/plant-1/line-3/temp", "kalima/out/plant-1/line-3/marker"],
            "{v:?}: line3-reader"
        );
        // The blind device has no marker it could read: give it the same time the others needed, and more.
        tokio::time::sleep(crate::support::QUIET).await;
        assert!(blind.messages().is_empty(), "{v:?}: a device without read grants received {:?}", blind.messages());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_read_grant_stops_deliveries_at_once() {
    let s = Setup::start().await;
    s.node.register("writer", &[("/plant-1", false, true)]).await;
    s.node.register("reader", &[("/plant-1/a", true, false), ("/plant-1/b", true, false)]).await;
    for v in VERSIONS {
        s.node.grant("reader", "/plant-1/a", true, false).await;
        let mut r = s.client(v, "reader").await;
        assert_eq!(r.subscribe(&[("kalima/out/plant-1/#", 1)]).await, vec![1]);
        let mut w = s.client(v, "writer").await;
        w.put("kalima/plant-1/a/x", b"before", 1, &[]).await;
        r.wait_message("kalima/out/plant-1/a/x").await;
        s.node.grant("reader", "/plant-1/a", false, false).await;
        w.put("kalima/plant-1/a/y", b"after", 1, &[]).await;
        w.put("kalima/plant-1/b/marker", b"m", 1, &[]).await;
        r.wait_message("kalima/out/plant-1/b/marker").await;
        assert_eq!(
            topics(&r.messages()),
            vec!["kalima/out/plant-1/a/x", "kalima/out/plant-1/b/marker"],
            "{v:?}: delivered after its read grant was removed"
        );
        r.close().await;
        w.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_does_not_duplicate_deliveries() {
    let s = Setup::start().await;
    s.node.register("writer", &[("/plant-1", false, true)]).await;
    s.node.register("reader", &[("/plant-1", true, false)]).await;
    for v in VERSIONS {
        let mut r = s.client(v, "reader").await;
        assert_eq!(r.subscribe(&[("kalima/out/plant-1/#", 1)]).await, vec![1]);
        r.unsubscribe(&["kalima/out/plant-1/#"]).await;
        assert_eq!(r.subscribe(&[("kalima/out/plant-1/#", 1)]).await, vec![1]);
        // The same filter twice in a row is one subscription too (MQTT replaces it).
        assert_eq!(r.subscribe(&[("kalima/out/plant-1/#", 1)]).await, vec![1]);
        let mut w = s.client(v, "writer").await;
        w.put("kalima/plant-1/line-2/temp", b"21.5", 1, &[]).await;
        r.wait_message("kalima/out/plant-1/line-2/temp").await;
        // Copies, if any, come from tasks running side by side: give them time to show.
        tokio::time::sleep(crate::support::QUIET).await;
        let n = r.messages().len();
        assert_eq!(
            n,
            1,
            "{v:?}: one put delivered {n} times after SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE:\n{}",
            r.describe()
        );
        r.close().await;
        w.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_stops_deliveries() {
    let s = Setup::start().await;
    s.node.register("writer", &[("/plant-1", false, true)]).await;
    s.node.register("reader", &[("/plant-1", true, false)]).await;
    for v in VERSIONS {
        let mut r = s.client(v, "reader").await;
        assert_eq!(r.subscribe(&[("kalima/out/plant-1/a/#", 1), ("kalima/out/plant-1/b/#", 1)]).await, vec![1, 1]);
        r.unsubscribe(&["kalima/out/plant-1/a/#"]).await;
        let mut w = s.client(v, "writer").await;
        w.put("kalima/plant-1/a/x", b"1", 1, &[]).await;
        w.put("kalima/plant-1/b/marker", b"2", 1, &[]).await;
        r.wait_message("kalima/out/plant-1/b/marker").await;
        assert_eq!(topics(&r.messages()), vec!["kalima/out/plant-1/b/marker"], "{v:?}");
        r.close().await;
        w.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_reach_a_subscriber_of_the_other_version() {
    let s = Setup::start().await;
    s.node.register("writer", &[("/plant-1", false, true)]).await;
    s.node.register("reader", &[("/plant-1", true, false)]).await;
    let mut r4 = PyClient::start(s.addr(), V::V311, Some(("reader", &crate::support::token("reader"))), "r4").await;
    assert_eq!(r4.connack(), Some(0));
    assert_eq!(r4.subscribe(&[("kalima/out/plant-1/+/temp", 1)]).await, vec![1]);
    let mut w5 = s.client(V::V5, "writer").await;
    w5.put("kalima/plant-1/line-2/temp", b"from v5", 1, &[("unit", "C")]).await;
    let m = r4.wait_message("kalima/out/plant-1/line-2/temp").await;
    assert_eq!(m.payload, b"from v5");
}
