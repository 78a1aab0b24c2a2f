//! Malformed and hostile input (DESIGN.md invariant 6): garbage, truncated and oversized
//! packets, packets out of order, unsupported protocol levels and random bytes, before and
//! after login. Each one ends its own connection (after at most a CONNACK refusal, or the
//! acknowledgements already owed), stores nothing, and the server keeps serving everybody
//! else: a good client works afterwards and the stored chain still verifies.

use std::time::Duration;

use kalima_adapter_mqtt::MqttSection;

use crate::support::{self, PyClient, Raw, Setup, V, VERSIONS, kind, rc, token};

/// Packet type of DISCONNECT.
const DISCONNECT: u8 = 14;

/// How long a hostile connection may stay open (the CONNECT timeout is 1 s).
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn section() -> MqttSection {
    // A short CONNECT timeout, so connections that stall before CONNECT end quickly.
    MqttSection { listen: "127.0.0.1:0".into(), connect_timeout_secs: 1, ..Default::default() }
}

/// What a hostile connection sends and what must come back before the server closes it.
struct Case {
    what: &'static str,
    /// Log in first (with this version) before sending `bytes`.
    login: Option<V>,
    bytes: Vec<u8>,
    /// Close our writing half after sending.
    eof: bool,
    /// Packets (type, reason/return code) the server may send before closing.
    before_close: Vec<(u8, u8)>,
}

fn connect_named(name: &[u8], level: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend((name.len() as u16).to_be_bytes());
    b.extend(name);
    b.extend([level, 0x02, 0, 60]);
    b.extend(4u16.to_be_bytes());
    b.extend(b"c-id");
    let mut p = vec![0x10, b.len() as u8];
    p.extend(b);
    p
}

fn cases() -> Vec<Case> {
    let good_connect = support::connect(V::V311, "x", Some(("sensor-1", &token("sensor-1"))));
    let c = |what, login, bytes: Vec<u8>| Case { what, login, bytes, eof: false, before_close: Vec::new() };
    let mut v = vec![
        c("an HTTP request", None, b"GET / HTTP/1.1\r\nHost: mqtt\r\n\r\n".to_vec()),
        c("random garbage", None, vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03, 0xff]),
        c(
            "a PUBLISH before CONNECT",
            None,
            support::publish(V::V311, "kalima/plant-1/early/temp", b"x", 1, 1, false, &[]),
        ),
        c("a PINGREQ before CONNECT", None, vec![0xc0, 0x00]),
        Case {
            what: "a truncated CONNECT, then end of file",
            login: None,
            bytes: good_connect[..good_connect.len() / 2].to_vec(),
            eof: true,
            before_close: Vec::new(),
        },
        // The server must not wait for the rest forever (connect timeout: 1 s here).
        c("a truncated CONNECT, then silence", None, good_connect[..good_connect.len() - 3].to_vec()),
        c("a CONNECT of zero length", None, vec![0x10, 0x00]),
        c("a remaining length of 5 bytes", None, vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        c("a CONNECT announcing 200 MB", None, {
            let mut b = vec![0x10, 0x80, 0x80, 0x80, 0x64];
            b.extend(&connect_named(b"MQTT", 4)[2..]);
            b
        }),
        c("a 100 KB CONNECT (over max_packet_bytes)", None, {
            let pw = "p".repeat(100 * 1024);
            support::connect(V::V311, "big", Some(("sensor-1", &pw)))
        }),
        c("a protocol name longer than 6 bytes", None, connect_named(b"MQTTMQTTMQTT", 4)),
        Case {
            what: "protocol level 3 (MQTT 3.1)",
            login: None,
            bytes: connect_named(b"MQIsdp", 3),
            eof: false,
            before_close: vec![(kind::CONNACK, 1)],
        },
        Case {
            what: "protocol level 6",
            login: None,
            bytes: connect_named(b"MQTT", 6),
            eof: false,
            before_close: vec![(kind::CONNACK, 1)],
        },
        Case {
            what: "nothing at all, then end of file",
            login: None,
            bytes: Vec::new(),
            eof: true,
            before_close: vec![],
        },
    ];
    for ver in VERSIONS {
        let p = |topic: &str, body: &[u8]| support::publish(ver, topic, body, 1, 1, false, &[]);
        v.extend([
            c("a second CONNECT", Some(ver), support::connect(ver, "again", Some(("sensor-1", &token("sensor-1"))))),
            c(
                "a 100 KB PUBLISH (over max_packet_bytes)",
                Some(ver),
                p("kalima/plant-1/big/temp", &vec![b'x'; 100 * 1024]),
            ),
            c("packet type 0 (reserved)", Some(ver), vec![0x00, 0x00]),
            c("a PUBLISH with QoS 3", Some(ver), {
                let mut b = p("kalima/plant-1/q3/temp", b"x");
                b[0] |= 0x06;
                b
            }),
            c("a PUBLISH whose topic overruns the packet", Some(ver), vec![0x30, 0x04, 0x00, 0x40, b'k', b'a']),
            c("a PUBLISH whose topic is not UTF-8", Some(ver), {
                let mut b = vec![0x32, 0x00];
                let mut body = vec![0x00, 0x04, b'k', b'/', 0xff, 0xfe, 0x00, 0x01];
                if ver == V::V5 {
                    body.push(0);
                }
                body.extend(b"x");
                b[1] = body.len() as u8;
                b.extend(body);
                b
            }),
            c("a CONNACK (a server-only packet)", Some(ver), vec![0x20, 0x02, 0x00, 0x00]),
            c("a SUBSCRIBE without filters", Some(ver), {
                let mut body = vec![0x00, 0x05];
                if ver == V::V5 {
                    body.push(0);
                }
                let mut b = vec![0x82, body.len() as u8];
                b.extend(body);
                b
            }),
            Case {
                what: "a good PUBLISH followed by garbage in the same write",
                login: Some(ver),
                bytes: {
                    let mut b = p("kalima/plant-1/owed/temp", b"owed");
                    b.extend([0x00, 0x00]);
                    b
                },
                eof: false,
                // The acknowledgement already owed goes out before the connection closes.
                before_close: vec![(kind::PUBACK, 0)],
            },
        ]);
    }
    // The properties length is missing: the packet is complete but malformed in MQTT 5 (the
    // same bytes are a valid, empty MQTT 3.1.1 PUBLISH).
    v.push(c("a QoS 1 PUBLISH that ends after its packet id", Some(V::V5), {
        let mut b = vec![0x32, 0x00, 0x00, 0x05];
        b.extend(b"k/a/b");
        b.extend(1u16.to_be_bytes());
        b[1] = (b.len() - 2) as u8;
        b
    }));
    v.push(c("an AUTH packet (enhanced authentication is not offered)", Some(V::V5), vec![0xf0, 0x00]));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_its_own_connection() {
    let s = Setup::start_with(section()).await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    // A client that stays connected through all of it, and is still served at the end.
    let mut bystander = s.client(V::V5, "sensor-1").await;
    let mut problems = Vec::new();
    for c in cases() {
        let mut raw = match c.login {
            Some(v) => Raw::login(s.addr(), v, "sensor-1").await,
            None => Raw::open(s.addr()).await,
        };
        raw.send(&c.bytes).await;
        if c.eof {
            raw.shutdown_write().await;
        }
        match raw.until_closed_within(CLOSE_WITHIN).await {
            Ok(packets) => {
                // An MQTT 5 server may say why with a DISCONNECT before it closes.
                let got: Vec<(u8, u8)> =
                    packets.iter().filter(|p| p.kind != DISCONNECT).map(|p| (p.kind, p.reason())).collect();
                if got != c.before_close {
                    problems.push(format!(
                        "{} ({:?}): got {got:x?} before the close, expected {:x?}",
                        c.what, c.login, c.before_close
                    ));
                }
            }
            Err(packets) => problems.push(format!(
                "{} ({:?}): connection still open after {CLOSE_WITHIN:?}; received {packets:x?}",
                c.what, c.login
            )),
        }
        // Still serving: a new, good login works right after.
        let mut probe = Raw::login(s.addr(), V::V311, "sensor-1").await;
        probe.send(&[0xc0, 0x00]).await;
        let pong = probe.next().await.map(|p| p.kind);
        assert_eq!(pong, Some(13), "after {}: no PINGRESP from a fresh connection", c.what);
    }
    for (address, key) in [("/plant-1/early", "temp"), ("/plant-1/big", "temp"), ("/plant-1/q3", "temp")] {
        if s.node.latest(address, key).is_some() {
            problems.push(format!("{address} {key} was stored from a malformed connection"));
        }
    }
    for v in VERSIONS {
        if s.node.history("/plant-1/owed", "temp").await.len() != 2 {
            problems.push(format!("{v:?}: the good PUBLISH before the garbage was not stored (acknowledged!)"));
        }
    }
    assert_eq!(
        bystander.put("kalima/plant-1/bystander/temp", b"still here", 1, &[]).await,
        rc::SUCCESS,
        "the bystander's put after the hostile connections:\n{}",
        bystander.describe()
    );
    s.node.assert_verifies().await;
    assert!(problems.is_empty(), "malformed input not handled as specified:\n  {}", problems.join("\n  "));
}

/// A small deterministic generator (no extra dependency; the same bytes on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = 1 + self.next() % max;
        (0..n).map(|_| (self.next() & 0xff) as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_before_and_after_login_never_stop_the_server() {
    let s = Setup::start_with(section()).await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    let mut rng = Lcg(0x6b61_6c69_6d61);
    for i in 0..240u32 {
        let mut raw = match i % 3 {
            0 => Raw::open(s.addr()).await,
            1 => Raw::login(s.addr(), V::V311, "sensor-1").await,
            _ => Raw::login(s.addr(), V::V5, "sensor-1").await,
        };
        let mut bytes = rng.bytes(300);
        // Half the time, start like a real packet so the parser goes deeper.
        if i % 2 == 0 {
            bytes[0] = [0x10, 0x30, 0x32, 0x82, 0xa2, 0x62, 0xc0, 0xe0][(rng.next() % 8) as usize];
        }
        raw.send(&bytes).await;
        raw.shutdown_write().await;
        // Whatever it answers, the server must end the connection once we are done.
        raw.until_closed().await;
    }
    let mut c = s.client(V::V5, "sensor-1").await;
    assert_eq!(c.put("kalima/plant-1/after/fuzz", b"ok", 1, &[]).await, rc::SUCCESS, "{}", c.describe());
    s.node.assert_verifies().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_as_server_busy() {
    let s =
        Setup::start_with(MqttSection { listen: "127.0.0.1:0".into(), max_connections: 2, ..Default::default() }).await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    for v in VERSIONS {
        let a = s.client(v, "sensor-1").await;
        let b = s.client(v, "sensor-1").await;
        let third = PyClient::start(s.addr(), v, Some(("sensor-1", &token("sensor-1"))), "third").await;
        // MQTT 3.1.1 "server unavailable" (3) shows as 0x88 in paho; MQTT 5 "server busy" is 0x89.
        let expected = if v == V::V5 { 0x89 } else { 0x88 };
        assert_eq!(third.connack(), Some(expected), "{v:?}: {}", third.describe());
        a.close().await;
        // A freed slot is usable again (the server notices the close a moment later).
        let mut retry = None;
        for _ in 0..50 {
            let c = PyClient::start(s.addr(), v, Some(("sensor-1", &token("sensor-1"))), "retry").await;
            if c.connack() == Some(0) {
                retry = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(retry.is_some(), "{v:?}: no login possible after a connection closed");
        b.close().await;
        if let Some(r) = retry {
            r.close().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
    for v in VERSIONS {
        let mut raw = Raw::open(s.addr()).await;
        let mut connect = support::connect(v, "sleepy", Some(("sensor-1", &token("sensor-1"))));
        // Keep-alive bytes sit right after the flags: 1 s.
        let ka = 2 + 6 + 1 + 1;
        connect[ka..ka + 2].copy_from_slice(&1u16.to_be_bytes());
        raw.send(&connect).await;
        let p = raw.next().await.expect("CONNACK");
        assert_eq!((p.kind, p.reason()), (kind::CONNACK, 0), "{v:?}");
        let started = std::time::Instant::now();
        assert!(raw.until_closed().await.is_empty(), "{v:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1400), "{v:?}: dropped after {waited:?}, before 1.5 x keep-alive");
    }
}
