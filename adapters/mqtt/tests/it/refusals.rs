//! Refusals (DESIGN.md invariant 4 and "a rejection is a clear error to the sender"): bad
//! logins get CONNACK "bad user name or password"; a put outside the write grant, with an
//! invalid topic or key, or with a body over 8 KB is refused with a fitting MQTT 5 reason
//! code, reported as JSON on `kalima/errors/<device>` (the only refusal MQTT 3.1.1 can see),
//! and never stored; a device may follow only `kalima/out/...` and its own errors topic.

use crate::support::{PyClient, Setup, V, VERSIONS, rc, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_are_refused_in_both_versions() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    s.node.register("sensor-2", &[("/plant-2", true, true)]).await;
    let good = token("sensor-1");
    let other = token("sensor-2");
    // (what, user name, password)
    let cases: [(&str, &str, &str); 5] = [
        ("wrong password", "sensor-1", "kal_not-the-token"),
        ("unknown device", "nobody", "kal_nobody-token"),
        ("user name of another device than the token's", "sensor-1", &other),
        ("token of a device under an unknown user name", "nobody", &good),
        ("empty password", "sensor-1", ""),
    ];
    for v in VERSIONS {
        for (what, user, password) in cases {
            let c = PyClient::start(s.addr(), v, Some((user, password)), "bad-login").await;
            assert_eq!(
                c.connack(),
                Some(rc::BAD_USER_NAME_OR_PASSWORD),
                "{v:?} {what}: CONNACK must refuse (bad user name or password):\n{}",
                c.describe()
            );
            c.wait_disconnect().await;
        }
        // No login at all.
        let c = PyClient::start(s.addr(), v, None, "no-login").await;
        assert_eq!(c.connack(), Some(rc::BAD_USER_NAME_OR_PASSWORD), "{v:?} without login:\n{}", c.describe());
        c.wait_disconnect().await;
        // The right pair still works after all those refusals.
        s.client(v, "sensor-1").await.close().await;
    }
}

/// A put a device must not make, and how it must be refused.
struct Refused {
    what: &'static str,
    topic: String,
    body: Vec<u8>,
    props: Vec<(&'static str, String)>,
    /// MQTT 5 reason codes accepted for it.
    reasons: &'static [i64],
    /// `code` of the JSON error report.
    code: &'static str,
    /// Address and key that must stay empty, when the topic names one.
    target: Option<(&'static str, &'static str)>,
}

fn refused_puts() -> Vec<Refused> {
    let r = |what, topic: &str, reasons, code, target| Refused {
        what,
        topic: topic.into(),
        body: b"21.5".to_vec(),
        props: Vec::new(),
        reasons,
        code,
        target,
    };
    vec![
        r(
            "outside the write grant",
            "kalima/plant-2/line-1/temp",
            &[rc::NOT_AUTHORIZED],
            "forbidden",
            Some(("/plant-2/line-1", "temp")),
        ),
        // The device record itself must stay as the admin wrote it (checked below).
        r("a system address", "kalima/_kalima/devices/sensor-1", &[rc::NOT_AUTHORIZED], "forbidden", None),
        r("an invalid key", "kalima/plant-1/line-2/te$mp", &[rc::TOPIC_NAME_INVALID], "invalid_key", None),
        r("an empty key", "kalima/plant-1/line-2/", &[rc::TOPIC_NAME_INVALID], "invalid_key", None),
        r("an empty address segment", "kalima/plant-1//temp", &[rc::TOPIC_NAME_INVALID], "invalid_address", None),
        // The topic is what is wrong: 0x90 "Topic Name invalid" says so; 0x99 "Payload
        // format invalid" would send the device looking at its payload.
        r("a topic without a key", "kalima/plant-1", &[rc::TOPIC_NAME_INVALID], "invalid_topic", None),
        r("a topic outside kalima/", "plant-1/line-2/temp", &[rc::TOPIC_NAME_INVALID], "invalid_topic", None),
        r(
            "the node's own delivery topics",
            "kalima/out/plant-1/line-2/temp",
            &[rc::TOPIC_NAME_INVALID, rc::NOT_AUTHORIZED],
            "invalid_topic",
            None,
        ),
        Refused {
            what: "a body over 8 KB",
            topic: "kalima/plant-1/line-2/big".into(),
            body: vec![b'x'; 8 * 1024 + 1],
            props: Vec::new(),
            reasons: &[rc::QUOTA_EXCEEDED],
            code: "too_large",
            target: Some(("/plant-1/line-2", "big")),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_puts_get_a_reason_an_error_report_and_are_not_stored() {
    // Every case runs; the failures are listed together at the end.
    let mut problems = Vec::new();
    for v in VERSIONS {
        let s = Setup::start().await;
        s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
        // Another connection of the same device (a maintenance app) follows its refusals.
        let mut watcher = s.client(v, "sensor-1").await;
        assert_eq!(watcher.subscribe(&[("kalima/errors/sensor-1", 0)]).await, vec![0], "{v:?}");
        let mut client = s.client(v, "sensor-1").await;
        let cases = refused_puts();
        for (i, c) in cases.iter().enumerate() {
            let props: Vec<(&str, &str)> = c.props.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let code = client.put(&c.topic, &c.body, 1, &props).await;
            // MQTT 3.1.1 has no negative PUBACK; there the error topic is the answer.
            if v == V::V5 && !c.reasons.contains(&code) {
                problems.push(format!(
                    "{v:?} {} ({}): PUBACK reason {code:#x}, expected one of {:x?}",
                    c.what, c.topic, c.reasons
                ));
            }
            let reports = crate::support::wait_for(
                &format!("{v:?} {}: the error report", c.what),
                || Some(watcher.messages()).filter(|m| m.len() > i),
                || watcher.describe(),
            )
            .await;
            let r = &reports[i];
            assert_eq!(r.topic, "kalima/errors/sensor-1", "{v:?} {}", c.what);
            let report: serde_json::Value = serde_json::from_slice(&r.payload)
                .unwrap_or_else(|e| panic!("{v:?} {}: error report is not JSON ({e})", c.what));
            if report["code"] != c.code
                || report["topic"] != c.topic.as_str()
                || report["message"].as_str().is_none_or(|m| m.is_empty())
            {
                problems.push(format!("{v:?} {}: error report {report}, expected code {:?}", c.what, c.code));
            }
            if let Some((address, key)) = c.target
                && s.node.latest(address, key).is_some()
            {
                problems.push(format!("{v:?} {}: stored anyway", c.what));
            }
        }
        let record = s.node.latest("/_kalima/devices", "sensor-1").map(|c| c.tx.content.device_id.clone());
        if record.as_deref() != Some("admin") {
            problems.push(format!("{v:?}: the device record was overwritten by {record:?}"));
        }
        // The refusals did not cost the connection: a good put still goes through.
        assert_eq!(client.put("kalima/plant-1/line-2/temp", b"22", 1, &[]).await, rc::SUCCESS, "{v:?}");
        assert!(!client.disconnected(), "{v:?}: {}", client.describe());
        // A body of exactly 8 KB is within the limit.
        let full = vec![b'y'; 8 * 1024];
        assert_eq!(client.put("kalima/plant-1/line-2/full", &full, 1, &[]).await, rc::SUCCESS, "{v:?}");
        assert_eq!(s.node.latest("/plant-1/line-2", "full").map(|c| c.tx.content.body.len()), Some(8 * 1024));
        s.node.assert_verifies().await;
    }
    assert!(problems.is_empty(), "refusals not as specified:\n  {}", problems.join("\n  "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_props_over_the_limits_are_refused_without_blaming_the_topic() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    let mut client = s.client(V::V5, "sensor-1").await;
    let long = "v".repeat(300);
    let code = client.put("kalima/plant-1/line-2/temp", b"21.5", 1, &[("note", &long)]).await;
    assert!(code >= 0x80, "a 300-byte property value (limit 256) must be refused, got {code:#x}");
    assert!(s.node.latest("/plant-1/line-2", "temp").is_none(), "stored anyway");
    // The topic is fine: "Topic Name invalid" would send the device after the wrong field.
    assert_ne!(code, rc::TOPIC_NAME_INVALID, "the refusal of a property blames the topic (0x90)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_delivery_topics_and_the_own_errors_topic_can_be_followed() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    s.node.register("sensor-2", &[("/plant-1", true, true)]).await;
    for v in VERSIONS {
        let mut c = s.client(v, "sensor-1").await;
        let no = v.suback_refused();
        // (filter, requested QoS, expected SUBACK code)
        let table: [(&str, u8, i64); 9] = [
            ("kalima/out/plant-1/#", 1, 1),
            ("kalima/out/#", 0, 0),
            ("kalima/errors/sensor-1", 0, 0),
            ("kalima/errors/sensor-2", 0, no),
            ("kalima/errors/+", 0, no),
            ("kalima/errors/#", 0, no),
            ("kalima/plant-1/#", 1, no),
            ("#", 0, no),
            ("$SYS/#", 0, no),
        ];
        for (filter, qos, expected) in table {
            let codes = c.subscribe(&[(filter, qos)]).await;
            assert_eq!(codes, vec![expected], "{v:?} SUBSCRIBE {filter} (QoS {qos})");
        }
        // Several filters in one SUBSCRIBE are answered one by one.
        let codes = c.subscribe(&[("kalima/out/plant-1/line-2/temp", 1), ("kalima/errors/sensor-2", 0)]).await;
        assert_eq!(codes, vec![1, no], "{v:?} mixed SUBSCRIBE");
        assert!(!c.disconnected(), "{v:?}: {}", c.describe());
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_device_does_not_see_the_refusals() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    s.node.register("sensor-2", &[("/plant-1", true, true)]).await;
    for v in VERSIONS {
        let mut other = s.client(v, "sensor-2").await;
        assert_eq!(other.subscribe(&[("kalima/errors/sensor-2", 0)]).await, vec![0]);
        let mut own = s.client(v, "sensor-1").await;
        assert_eq!(own.subscribe(&[("kalima/errors/sensor-1", 0)]).await, vec![0]);
        let mut client = s.client(v, "sensor-1").await;
        client.put("kalima/plant-9/x/temp", b"1", 1, &[]).await;
        own.wait_message("kalima/errors/sensor-1").await;
        // sensor-2's own refusal marks the end of the window in which sensor-1's could show.
        let mut c2 = s.client(v, "sensor-2").await;
        c2.put("kalima/plant-9/x/temp", b"2", 1, &[]).await;
        other.wait_message("kalima/errors/sensor-2").await;
        let seen = other.messages();
        assert_eq!(seen.len(), 1, "{v:?}: sensor-2 sees another device's refusals: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_does_not_silence_another_devices_errors_topic() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    s.node.register("noisy", &[("/noisy", true, true)]).await;
    let mut watcher = s.client(V::V5, "sensor-1").await;
    assert_eq!(watcher.subscribe(&[("kalima/errors/sensor-1", 0)]).await, vec![0]);
    // 5,000 refused QoS 0 puts in a few large writes, from a device of no concern to the watcher.
    let mut raw = crate::support::Raw::login(s.addr(), V::V311, "noisy").await;
    let one = crate::support::publish(V::V311, "kalima/plant-1/x/temp", b"1", 0, 0, false, &[]);
    let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    for _ in 0..5 {
        raw.send(&burst).await;
    }
    // A PINGRESP proves the flood was read.
    raw.send(&[0xc0, 0x00]).await;
    let pong = raw.next().await.map(|p| p.kind);
    assert_eq!(pong, Some(13), "the noisy connection did not answer its PINGREQ");
    let mut c = s.client(V::V5, "sensor-1").await;
    assert_eq!(c.put("kalima/plant-9/x/temp", b"1", 1, &[]).await, rc::NOT_AUTHORIZED);
    let m = watcher.wait_message("kalima/errors/sensor-1").await;
    assert!(String::from_utf8_lossy(&m.payload).contains("forbidden"), "{m:?}");
}
