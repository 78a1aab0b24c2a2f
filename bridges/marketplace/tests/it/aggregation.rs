//! Aggregated feeds: one value per key and window, computed from the numeric readings of that
//! window only, each source reading delivered with its proof so the buyer can recompute it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kalima_core::Receipt;
use kalima_core::ledger::market::AggregateFn;
use kalima_marketplace::{Delivered, follow};

use crate::common::{Market, PROVIDER, check_source, next, spec, windowed};

/// Sleeps until `margin_ms` into the next whole second of the wall clock (windows are of one
/// second, on the commit time the node stamps from that clock).
async fn into_next_second(margin_ms: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    let into = now.as_millis() as u64 % 1000;
    tokio::time::sleep(Duration::from_millis(1000 - into + margin_ms)).await;
}

/// One expected aggregate: the numeric values of a key's window, in chain order, and their
/// transaction ids.
#[derive(Debug, Default)]
struct Expected {
    values: Vec<f64>,
    ids: Vec<String>,
}

fn apply(f: AggregateFn, v: &[f64]) -> f64 {
    match f {
        AggregateFn::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
        AggregateFn::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        AggregateFn::Mean => v.iter().sum::<f64>() / v.len() as f64,
        AggregateFn::Last => *v.last().expect("a value"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_window_of_each_key_gives_one_aggregate_of_its_numeric_readings() {
    let m = Market::start().await;
    let functions = [AggregateFn::Min, AggregateFn::Max, AggregateFn::Mean, AggregateFn::Last];
    let mut streams = Vec::new();
    for f in functions {
        let id = format!("line-1-{f:?}").to_lowercase();
        m.list(PROVIDER, windowed(spec(&id, "/plant-1/line-1", &["temp", "pressure"], &m.payout), f, 1)).await;
        let s = m.subscribe(&id).await;
        let stream = follow(&m.t.chain, s.access.clone(), None, "sse", Duration::from_secs(3600));
        streams.push((f, id, s, stream));
    }

    // Two windows of readings of two keys, among readings that are not numbers and readings the
    // feeds do not cover. Numbers may come bare, as a JSON string, or as {"value": n}.
    let first: &[(&str, &str, &str)] = &[
        ("/plant-1/line-1", "temp", "21.5"),
        ("/plant-1/line-1", "pressure", "1.25"),
        ("/plant-1/line-1", "temp", "\"19.0\""),
        ("/plant-1/line-1", "temp", "offline"),
        ("/plant-1/line-1", "temp", r#"{"status":"offline"}"#),
        ("/plant-1/line-1", "humidity", "55"),
        ("/plant-1/line-1", "temp", r#"{"value":23.25,"unit":"C"}"#),
        ("/plant-1/line-1", "pressure", "1.5"),
        ("/plant-1/line-2", "temp", "80"),
    ];
    let second: &[(&str, &str, &str)] = &[
        ("/plant-1/line-1", "pressure", "2"),
        ("/plant-1/line-1", "temp", "30"),
        ("/plant-1/line-1", "temp", "true"),
        ("/plant-1/line-1", "temp", "28.5"),
    ];
    into_next_second(50).await;
    let mut written: Vec<(Receipt, &str, &str, &str)> = Vec::new();
    for chunk in first.chunks(3) {
        written.extend(m.write_all(chunk).await.into_iter().zip(chunk).map(|(r, (a, k, b))| (r, *a, *k, *b)));
    }
    into_next_second(50).await;
    for chunk in second.chunks(2) {
        written.extend(m.write_all(chunk).await.into_iter().zip(chunk).map(|(r, (a, k, b))| (r, *a, *k, *b)));
    }

    // What the windows hold, from the commit times the chain stamped.
    let mut expected: BTreeMap<(String, i64), Expected> = BTreeMap::new();
    let mut windows_seen = std::collections::BTreeSet::new();
    for (r, address, key, body) in &written {
        let ts = m.tx(r.global_sequence).await.tx.timestamp_ms;
        let start = ts.div_euclid(1000) * 1000;
        windows_seen.insert(start);
        let number = match serde_json::from_str::<serde_json::Value>(body) {
            Ok(serde_json::Value::Number(n)) => n.as_f64(),
            Ok(serde_json::Value::String(s)) => s.parse().ok(),
            Ok(serde_json::Value::Object(o)) => o.get("value").and_then(serde_json::Value::as_f64),
            _ => None,
        };
        if *address == "/plant-1/line-1"
            && matches!(*key, "temp" | "pressure")
            && let Some(v) = number
        {
            let e = expected.entry((key.to_string(), start)).or_default();
            e.values.push(v);
            e.ids.push(hex::encode(r.id));
        }
    }
    assert!(windows_seen.len() >= 2, "the readings span two windows: {windows_seen:?}");
    assert_eq!(expected.len(), 4, "two keys in two windows: {expected:?}");

    for (f, id, s, mut stream) in streams {
        let mut got: BTreeMap<(String, i64), Delivered> = BTreeMap::new();
        let mut last_start: BTreeMap<String, i64> = BTreeMap::new();
        while got.len() < expected.len() {
            let d = next(&mut stream, &format!("{id}: aggregate {} of {}", got.len() + 1, expected.len())).await;
            let Delivered::Aggregate {
                ref feed, ref address, ref key, function, window_start_ms, window_end_ms, ..
            } = d
            else {
                panic!("{id}: an aggregated feed delivers aggregates, got {d:?}");
            };
            assert_eq!((feed.as_str(), address.as_str(), function), (id.as_str(), "/plant-1/line-1", f));
            assert_eq!(window_end_ms - window_start_ms, 1000);
            assert!(
                last_start.insert(key.clone(), window_start_ms).is_none_or(|prev| prev < window_start_ms),
                "{id}: the windows of {key} come in order"
            );
            assert_eq!(
                d.delivery_id(s.id()),
                format!("{}:/plant-1/line-1:{key}:{window_start_ms}", s.id()),
                "{id}: one delivery id per key and window"
            );
            assert!(got.insert((key.clone(), window_start_ms), d).is_none(), "{id}: one aggregate per window");
        }
        for ((key, start), e) in &expected {
            let Some(Delivered::Aggregate { value, count, sources, .. }) = got.get(&(key.clone(), *start)) else {
                panic!("{id}: no aggregate of {key} at {start}; got {:?}", got.keys().collect::<Vec<_>>());
            };
            let want = apply(f, &e.values);
            assert!((value - want).abs() <= 1e-9 * want.abs().max(1.0), "{id} {key}@{start}: {value} != {want}");
            assert_eq!(*count, e.values.len() as u64, "{id} {key}@{start}: only numeric readings count");
            let ids: Vec<&str> = sources.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(ids, e.ids, "{id} {key}@{start}: the sources are the counted readings, in order");
            for src in sources {
                let tx = check_source(src);
                assert_eq!(tx.content.key, *key);
                assert_eq!(tx.timestamp_ms.div_euclid(1000) * 1000, *start, "a source lies in its window");
            }
        }
        for d in got.values() {
            let Delivered::Aggregate { sources, .. } = d else { continue };
            let newest = sources.iter().map(|s| s.global_sequence).max();
            assert_eq!(Some(d.last_sequence()), newest, "{id}: a buyer resumes after the newest source");
        }
    }
}
