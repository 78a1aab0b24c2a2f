//! Ordering and throughput sanity: a paho client pipelining 2,000 QoS 1 puts gets every PUBACK,
//! in the order it published, and every put is on the chain exactly once, in that order.
//! Then what a burst of packets read at once must not change: PUBACKs keep the order of the
//! PUBLISHes even when some are refused (MQTT 3.1.1 section 4.6, MQTT 5 section 4.6), one
//! refused put does not take the others of its burst down with it, and a QoS 2 packet id
//! whose PUBREC refused the message is free for the next message.

use serde_json::json;

use crate::support::{self, Raw, Setup, V, VERSIONS, kind, rc, token};

const PIPELINED: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_pipelined_qos1_puts_are_acked_in_order_and_stored_once() {
    let s = Setup::start().await;
    s.node.register("bulk", &[("/bulk", false, true)]).await;
    let mut problems = Vec::new();
    for v in VERSIONS {
        let version = if v == V::V5 { "5" } else { "3.1.1" };
        let key = if v == V::V5 { "v5" } else { "v311" };
        let started = std::time::Instant::now();
        let res = support::run_publisher(json!({
            "host": "127.0.0.1",
            "port": s.addr().port(),
            "version": version,
            "username": "bulk",
            "password": token("bulk"),
            "client_id": format!("bulk-{key}"),
            "topic": format!("kalima/bulk/line/{key}"),
            "qos": 1,
            "payload": "{n}",
            "count": PIPELINED,
            "window": 200,
            "timeout_s": 120,
        }))
        .await;
        let elapsed = started.elapsed();
        assert_eq!(res["connack"], 0, "{v:?}: {res}");
        assert_eq!(res["end"], "done", "{v:?}: the publisher did not get every acknowledgement: {}", short(&res));
        let acks = res["acks"].as_array().expect("acks");
        let numbers: Vec<u64> = acks.iter().map(|a| a[0].as_u64().expect("message number")).collect();
        let expected: Vec<u64> = (0..PIPELINED).collect();
        assert_eq!(numbers, expected, "{v:?}: PUBACKs out of publish order (or missing)");
        let refused: Vec<_> = acks.iter().filter(|a| a[2].as_i64() != Some(rc::SUCCESS)).collect();
        assert!(refused.is_empty(), "{v:?}: refused: {refused:?}");
        let stored: Vec<u64> = s
            .node
            .bodies("/bulk/line", key)
            .await
            .iter()
            .map(|b| String::from_utf8_lossy(b).parse::<u64>().expect("a stored message number"))
            .collect();
        let mut sorted = stored.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected, "{v:?}: the chain must hold every message exactly once");
        // Same address and key: the chain's order is the order of the readings, and the
        // current value must be the last one published.
        let misplaced: Vec<(usize, u64)> =
            stored.iter().enumerate().filter(|(i, n)| **n != *i as u64).map(|(i, n)| (i, *n)).collect();
        if !misplaced.is_empty() {
            let latest =
                s.node.latest("/bulk/line", key).map(|c| String::from_utf8_lossy(&c.tx.content.body).into_owned());
            problems.push(format!(
                "{v:?}: {} of {PIPELINED} messages stored out of publish order (position, message): {:?}...; current value {latest:?}",
                misplaced.len(),
                &misplaced[..misplaced.len().min(12)]
            ));
        }
        eprintln!("{v:?}: {PIPELINED} pipelined QoS 1 puts acknowledged and stored in {elapsed:?}");
    }
    s.node.assert_verifies().await;
    assert!(
        problems.is_empty(),
        "pipelined puts of one connection reordered on the chain:\n  {}",
        problems.join("\n  ")
    );
}

fn short(v: &serde_json::Value) -> String {
    let mut s = v.clone();
    if let Some(a) = s["acks"].as_array() {
        let n = a.len();
        s["acks"] = json!(format!("{n} acks, last: {:?}", a.last()));
    }
    s.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_keep_publish_order_when_a_put_of_the_burst_is_refused() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    for v in VERSIONS {
        let mut raw = Raw::login(s.addr(), v, "sensor-1").await;
        // One write, so the server reads the three PUBLISHes together.
        let mut burst = support::publish(v, "kalima/plant-1/a/temp", b"1", 1, 1, false, &[]);
        burst.extend(support::publish(v, "kalima/plant-2/a/temp", b"2", 1, 2, false, &[]));
        burst.extend(support::publish(v, "kalima/plant-1/a/temp", b"3", 1, 3, false, &[]));
        raw.send(&burst).await;
        let mut order = Vec::new();
        for _ in 0..3 {
            let p = raw.next().await.unwrap_or_else(|| panic!("{v:?}: connection closed after {order:?}"));
            assert_eq!(p.kind, kind::PUBACK, "{v:?}: {p:?}");
            order.push(p.pkid());
        }
        assert_eq!(order, vec![1, 2, 3], "{v:?}: PUBACKs must follow the order of the PUBLISHes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_a_burst_does_not_refuse_the_original() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    let v = V::V5;
    let mut raw = Raw::login(s.addr(), v, "sensor-1").await;
    // A client that resends quickly (its own retry) puts both copies on the wire together.
    let idem = [("idempotency_key", "reading-7")];
    let mut burst = support::publish(v, "kalima/plant-1/a/temp", b"7", 1, 1, false, &idem);
    burst.extend(support::publish(v, "kalima/plant-1/a/temp", b"7", 1, 2, false, &idem));
    burst.extend(support::publish(v, "kalima/plant-1/a/other", b"8", 1, 3, false, &[]));
    raw.send(&burst).await;
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let p = raw.next().await.unwrap_or_else(|| panic!("connection closed after {reasons:?}"));
        assert_eq!(p.kind, kind::PUBACK, "{p:?}");
        reasons.push((p.pkid(), p.reason()));
    }
    reasons.sort();
    let stored = s.node.bodies("/plant-1/a", "temp").await;
    let other = s.node.bodies("/plant-1/a", "other").await;
    assert!(
        reasons[0].1 == 0 && reasons[1].1 >= 0x80 && reasons[2].1 == 0 && stored.len() == 1 && other.len() == 1,
        "the original and an unrelated put must be stored and acknowledged, only the copy refused; \
         got PUBACKs (pkid, reason) {reasons:?}, stored temp {stored:?}, other {other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_packet_id_refused_at_commit_is_free_for_the_next_message() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    let v = V::V5;
    let mut raw = Raw::login(s.addr(), v, "sensor-1").await;
    // Two QoS 2 PUBLISHes with one idempotency key in one burst: the second is a duplicate,
    // refused when the burst is committed (not by the per-message checks).
    let idem = [("idempotency_key", "reading-9")];
    let mut burst = support::publish(v, "kalima/plant-1/a/temp", b"9", 2, 1, false, &idem);
    burst.extend(support::publish(v, "kalima/plant-1/a/temp", b"9", 2, 2, false, &idem));
    raw.send(&burst).await;
    let mut recs = Vec::new();
    for _ in 0..2 {
        let p = raw.next().await.expect("PUBREC");
        assert_eq!(p.kind, kind::PUBREC, "{p:?}");
        recs.push((p.pkid(), p.reason()));
    }
    // MQTT 5 section 4.3.3: after a PUBREC with a reason of 0x80 or more the packet id is
    // released and no PUBREL follows. Complete the successful ones as a client would.
    for (pkid, reason) in &recs {
        if *reason < 0x80 {
            raw.send(&support::pubrel(*pkid)).await;
            let comp = raw.next().await.expect("PUBCOMP");
            assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, *pkid));
        }
    }
    let refused: Vec<u16> = recs.iter().filter(|(_, r)| *r >= 0x80).map(|(p, _)| *p).collect();
    assert!(!refused.is_empty(), "the duplicate must be refused: PUBRECs {recs:?}");
    // A new message reuses a released packet id.
    let pkid = refused[0];
    raw.send(&support::publish(v, "kalima/plant-1/b/temp", b"new", 2, pkid, false, &[])).await;
    let rec = raw.next().await.expect("PUBREC of the new message");
    assert_eq!(rec.kind, kind::PUBREC, "{rec:?}");
    if rec.reason() < 0x80 {
        // Acknowledged as received: it must be stored (DESIGN.md invariant 1).
        assert_eq!(
            s.node.bodies("/plant-1/b", "temp").await,
            vec![b"new".to_vec()],
            "PUBREC {pkid} accepted a new QoS 2 message that was never stored (PUBRECs of the burst: {recs:?})"
        );
    }
}
