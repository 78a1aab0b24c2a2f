//! Raw delivery: a buyer gets exactly the feed's readings (its prefix and keys, puts only), in
//! chain order, each one checkable on its own; a buyer who reconnects after the last sequence
//! it got receives what it missed and then the live readings, nothing twice and nothing lost.

use std::time::Duration;

use kalima_core::Receipt;
use kalima_marketplace::{Delivered, follow};

use crate::common::{Market, PROVIDER, check_reading, next, next_reading, spec};

/// Long enough that no delivery record is written during these tests.
const NO_RECORDS: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_raw_feed_delivers_its_readings_in_order_each_with_a_proof() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1", "/plant-1/line-1", &["temp", "pressure"], &m.payout)).await;
    let s = m.subscribe("line-1").await;
    let before = m.write("/plant-1/line-1", "temp", "20.0").await;
    let mut stream = follow(&m.t.chain, s.access.clone(), None, "sse", NO_RECORDS);

    // What a buyer of the feed must get, and around it what it must not.
    let mut expected: Vec<(Receipt, &str, &str, &str)> = Vec::new();
    let r = m.write("/plant-1/line-1", "temp", "21.5").await;
    expected.push((r, "/plant-1/line-1", "temp", "21.5"));
    m.write("/plant-1/line-1", "humidity", "40").await; // another key
    m.write("/plant-1/line-2", "temp", "99").await; // another address
    m.write("/plant-1/line-10", "temp", "99").await; // a longer segment, not under the prefix
    m.write("/plant-2", "temp", "99").await; // another provider's data
    let batch = m
        .write_all(&[
            ("/plant-1/line-1/east", "temp", r#"{"value":22.0,"unit":"C"}"#),
            ("/plant-1/line-1", "pressure", "1.2"),
            ("/plant-1/line-1", "status", "ok"),
            ("/plant-1/line-1", "temp", "not json"),
        ])
        .await;
    expected.push((batch[0].clone(), "/plant-1/line-1/east", "temp", r#"{"value":22.0,"unit":"C"}"#));
    expected.push((batch[1].clone(), "/plant-1/line-1", "pressure", "1.2"));
    expected.push((batch[3].clone(), "/plant-1/line-1", "temp", "not json"));
    m.write("/plant-1/line-1", "pressure", "").await; // a delete
    let last = m.write("/plant-1/line-1", "temp", "23.0").await;
    expected.push((last, "/plant-1/line-1", "temp", "23.0"));

    for (i, (receipt, address, key, body)) in expected.iter().enumerate() {
        let d = next(&mut stream, &format!("reading {i}")).await;
        assert_eq!(d.delivery_id(s.id()), format!("{}:{}", s.id(), hex::encode(receipt.id)));
        assert_eq!(d.last_sequence(), receipt.global_sequence);
        let Delivered::Reading { feed, reading } = d else { panic!("a raw feed delivers readings: {d:?}") };
        assert_eq!(feed, "line-1");
        check_reading(&reading, receipt, address, key, body);
        assert_ne!(reading.global_sequence, before.global_sequence, "a reading before the stream is not replayed");
        // The proof leads to the root the chain itself had at that size.
        let root = m.t.chain.root_at(reading.proof.tree_size).await.expect("root");
        assert_eq!(reading.proof.root, hex::encode(root));
    }
    // Nothing else was delivered in between: the next one is the next wanted reading.
    let more = m.write("/plant-1/line-1", "temp", "24.0").await;
    let r = next_reading(&mut stream, "the reading after").await;
    check_reading(&r, &more, "/plant-1/line-1", "temp", "24.0");
    assert_eq!(r.value, Some(serde_json::json!(24.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_resuming_after_a_sequence_gets_what_it_missed_then_live_readings_exactly_once() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;

    // Connected: the buyer gets three readings, then disconnects.
    let mut stream = follow(&m.t.chain, s.access.clone(), None, "ws", NO_RECORDS);
    let mut seen = Vec::new();
    for i in 0..3 {
        m.write("/plant-1/line-2", "temp", "0").await;
        let r = m.write("/plant-1/line-1", "temp", &i.to_string()).await;
        let got = next_reading(&mut stream, "connected").await;
        check_reading(&got, &r, "/plant-1/line-1", "temp", &i.to_string());
        seen.push(got.global_sequence);
    }
    drop(stream);
    let resume_after = *seen.last().expect("three readings");

    // Missed while away: readings amid more other writes than one page of the store's replay.
    let mut missed: Vec<(&str, &str, String)> = Vec::new();
    for i in 0..1500 {
        match i % 100 {
            0 => missed.push(("/plant-1/line-1", "temp", format!("missed-{i}"))),
            50 => missed.push(("/plant-1/line-1", "pressure", "1".into())),
            _ => missed.push(("/plant-1/line-9", "temp", "1".into())),
        }
    }
    let items: Vec<(&str, &str, &str)> = missed.iter().map(|(a, k, b)| (*a, *k, b.as_str())).collect();
    let mut wanted: Vec<(Receipt, String)> = m
        .write_all(&items)
        .await
        .into_iter()
        .zip(&missed)
        .filter(|(_, (a, k, _))| *a == "/plant-1/line-1" && *k == "temp")
        .map(|(r, (_, _, b))| (r, b.clone()))
        .collect();
    assert_eq!(wanted.len(), 15);

    // Live writes go on while the buyer reconnects and its replay runs.
    let writer = async {
        let mut out = Vec::new();
        for i in 0..40 {
            let body = format!("live-{i}");
            out.push((m.write("/plant-1/line-1", "temp", &body).await, body));
            m.write("/plant-1/line-1", "humidity", "1").await;
        }
        out
    };
    let reconnect = async { follow(&m.t.chain, s.access.clone(), Some(resume_after), "ws", NO_RECORDS) };
    let (live, mut stream) = tokio::join!(writer, reconnect);
    wanted.extend(live);

    let mut got = Vec::with_capacity(wanted.len());
    for i in 0..wanted.len() {
        got.push(next_reading(&mut stream, &format!("resumed reading {i} of {}", wanted.len())).await);
    }
    for (g, (r, body)) in got.iter().zip(&wanted) {
        check_reading(g, r, "/plant-1/line-1", "temp", body);
    }
    let seqs: Vec<u64> = got.iter().map(|g| g.global_sequence).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in chain order, none twice");
    assert!(seqs[0] > resume_after, "nothing at or before the resume point");

    // And nothing beyond: the next delivery is the next reading written.
    let after = m.write("/plant-1/line-1", "temp", "last").await;
    check_reading(&next_reading(&mut stream, "after the replay").await, &after, "/plant-1/line-1", "temp", "last");
}

#[tokio::test]
async fn a_resume_point_at_the_head_delivers_only_live_readings() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    let old = m.write("/plant-1/line-1", "temp", "old").await;
    let mut stream = follow(&m.t.chain, s.access.clone(), Some(old.global_sequence), "sse", NO_RECORDS);
    let new = m.write("/plant-1/line-1", "temp", "new").await;
    let got = next_reading(&mut stream, "live").await;
    check_reading(&got, &new, "/plant-1/line-1", "temp", "new");
}
