//! Kalima REST compatibility surface: every route walked as the admin and as a device that
//! may read one prefix only, Kalima's statuses (200/405/406), the transaction JSON, paging by
//! per-address and global sequence, and the rejection counters of the `kalima_rest` interface.

use axum::http::{Method, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::support::TestNode;

/// The hex id of `/api/v1` for a Kalima `hash` (base64 of the same 32 bytes).
fn hex_id(kalima_hash: &Value) -> String {
    hex::encode(B64.decode(kalima_hash.as_str().expect("hash")).expect("hash is base64"))
}

/// The `props` of a Kalima transaction: base64 of a Java properties text, parsed.
fn props_of(t: &Value) -> std::collections::BTreeMap<String, String> {
    let text = String::from_utf8(B64.decode(t["props"].as_str().expect("props")).expect("base64")).expect("utf-8");
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.replace('\\', ""), v.replace('\\', ""))).collect()
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// Who sends a request, and how it presents its token.
#[derive(Clone, Copy, Debug)]
enum Who {
    /// The admin token, bare (as Kalima's clients send it).
    Admin,
    /// The admin token as `Bearer <token>`.
    AdminBearer,
    /// A device with a read grant on `/plant-1` only.
    Scoped,
    /// A token nobody holds.
    Stranger,
    /// No `Authorization` header.
    Anonymous,
}

/// A reusable assertion on a JSON answer.
enum Check {
    /// The error code of a 406.
    Code(&'static str),
    /// The value at a JSON pointer.
    Eq(&'static str, Value),
    /// Array length.
    Len(usize),
    /// The array contains this element.
    Has(Value),
    /// The array lacks this element.
    Lacks(Value),
    /// Every transaction of the array is under this prefix.
    AllUnder(&'static str),
    /// `sequence` of each element of the array, in order.
    Seqs(Vec<u64>),
}

struct Case {
    name: &'static str,
    method: Method,
    uri: String,
    who: Who,
    body: Option<Value>,
    status: StatusCode,
    checks: Vec<Check>,
}

fn case(name: &'static str, method: Method, uri: &str, who: Who, status: u16) -> Case {
    Case {
        name,
        method,
        uri: uri.to_string(),
        who,
        body: None,
        status: StatusCode::from_u16(status).expect("status"),
        checks: Vec::new(),
    }
}

impl Case {
    fn body(mut self, v: Value) -> Self {
        self.body = Some(v);
        self
    }
    fn check(mut self, c: Check) -> Self {
        self.checks.push(c);
        self
    }
    fn code(self, code: &'static str) -> Self {
        self.check(Check::Code(code))
    }
}

/// The node, the scoped device's token, and request helpers in Kalima's style.
struct Kalima {
    node: TestNode,
    scoped: String,
}

impl Kalima {
    async fn new() -> Self {
        let node = TestNode::new().await;
        let scoped = node.device("scoped", &[("/plant-1", true, false)]).await;
        Kalima { node, scoped }
    }

    fn authorization(&self, who: Who) -> Option<String> {
        match who {
            Who::Admin => Some(self.node.admin.clone()),
            Who::AdminBearer => Some(format!("Bearer {}", self.node.admin)),
            Who::Scoped => Some(self.scoped.clone()),
            Who::Stranger => Some("not-a-token".into()),
            Who::Anonymous => None,
        }
    }

    async fn send(&self, method: Method, uri: &str, who: Who, body: Option<Value>) -> (StatusCode, Value) {
        self.node.call_raw(method, uri, self.authorization(who), body.map(|b| b.to_string())).await
    }

    async fn get(&self, uri: &str, who: Who) -> Value {
        let (s, v) = self.send(Method::GET, uri, who, None).await;
        assert_eq!(s, StatusCode::OK, "GET {uri}: {v}");
        v
    }

    async fn post(&self, address: &str, key: &str, body: &str) -> Value {
        let req = json!({ "address": address, "key": key, "body": b64(body) });
        let (s, v) = self.send(Method::POST, "/transaction", Who::Admin, Some(req)).await;
        assert_eq!(s, StatusCode::OK, "POST {address} {key}: {v}");
        v
    }

    /// Runs the cases in order; each sees what the earlier ones wrote.
    async fn run(&self, cases: Vec<Case>) {
        for c in cases {
            let (status, v) = self.send(c.method.clone(), &c.uri, c.who, c.body.clone()).await;
            let name = c.name;
            assert_eq!(status, c.status, "{name}: {} {} as {:?}: {v}", c.method, c.uri, c.who);
            if status == StatusCode::NOT_ACCEPTABLE {
                assert!(v["error"].is_string(), "{name}: 406 without an error message: {v}");
            }
            for check in &c.checks {
                apply(name, check, &v);
            }
        }
    }

    async fn stop(self) {
        self.node.stop().await;
    }
}

fn apply(name: &str, check: &Check, v: &Value) {
    let items = || v.as_array().unwrap_or_else(|| panic!("{name}: not an array: {v}"));
    match check {
        Check::Code(code) => assert_eq!(v["code"], json!(code), "{name}: {v}"),
        Check::Eq(ptr, want) => assert_eq!(v.pointer(ptr), Some(want), "{name}: {ptr} in {v}"),
        Check::Len(n) => assert_eq!(items().len(), *n, "{name}: {v}"),
        Check::Has(x) => assert!(items().contains(x), "{name}: {x} missing from {v}"),
        Check::Lacks(x) => assert!(!items().contains(x), "{name}: {x} present in {v}"),
        Check::AllUnder(p) => {
            for t in items() {
                let a = t["address"].as_str().unwrap_or_default();
                assert!(a == *p || a.starts_with(&format!("{p}/")), "{name}: {a} is not under {p}");
            }
        }
        Check::Seqs(want) => {
            let got: Vec<u64> = items().iter().map(|t| t["sequence"].as_u64().unwrap_or(0)).collect();
            assert_eq!(&got, want, "{name}: {v}");
        }
    }
}

fn put(address: &str, key: &str, body: &str) -> Value {
    json!({ "address": address, "key": key, "body": b64(body) })
}

/// `YYMMdd` / `HHmmss` in UTC, computed without the server's format description.
fn expected_date_time(ms: i64) -> (String, String) {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("timestamp");
    let date = format!("{:02}{:02}{:02}", t.year() % 100, u8::from(t.month()), t.day());
    let time = format!("{:02}{:02}{:02}", t.hour(), t.minute(), t.second());
    (date, time)
}

/// Value of `kalima_writes_rejected_total{reason, interface="kalima_rest"}` (0 when absent).
fn rejected(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("kalima_writes_rejected_total{"))
        .filter(|l| l.contains("interface=\"kalima_rest\"") && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn compat_walk_every_route_as_admin_and_scoped_device() {
    let k = Kalima::new().await;
    use Check::*;
    use Method as M;
    use Who::*;
    let l1 = "/plant-1/line-1";
    k.run(vec![
        // Writes, with the bare token and with Bearer.
        case("put temp", M::POST, "/transaction", Admin, 200)
            .body(json!({ "address": l1, "key": "temp", "body": b64("21.5"), "ttl": 3600 }))
            .check(Eq("/address", json!(l1)))
            .check(Eq("/key", json!("temp")))
            .check(Eq("/sequence", json!(1)))
            .check(Eq("/body", json!(b64("21.5"))))
            .check(Eq("/previous", json!(0))),
        case("put pressure (Bearer, ttl -1)", M::POST, "/transaction", AdminBearer, 200)
            .body(json!({ "address": l1, "key": "pressure", "body": b64("1013"), "ttl": -1 }))
            .check(Eq("/sequence", json!(2))),
        case("put plant-2", M::POST, "/transaction", Admin, 200).body(put("/plant-2", "temp", "19")),
        case("scoped may not write its read prefix", M::POST, "/transaction", Scoped, 406)
            .body(put(l1, "temp", "1"))
            .code("forbidden"),
        case("scoped may not write elsewhere", M::POST, "/transaction", Scoped, 406)
            .body(put("/plant-2", "temp", "1"))
            .code("forbidden"),
        // Current values.
        case("read key", M::GET, "/transaction?address=/plant-1/line-1&key=temp", Admin, 200)
            .check(Eq("/body", json!(b64("21.5")))),
        case("scoped reads key", M::GET, "/transaction?address=/plant-1/line-1&key=temp", Scoped, 200)
            .check(Eq("/key", json!("temp"))),
        case("scoped may not read plant-2", M::GET, "/transaction?address=/plant-2&key=temp", Scoped, 406)
            .code("forbidden"),
        case("missing key", M::GET, "/transaction?address=/plant-1/line-1&key=nope", Admin, 406).code("not_found"),
        case("missing address param", M::GET, "/transaction?key=temp", Admin, 406).code("invalid_query"),
        case("invalid key on read", M::GET, "/transaction?address=/plant-1/line-1&key=a%23b", Admin, 406)
            .code("invalid_key"),
        case("list as admin", M::GET, "/cache/list", Admin, 200).check(Has(json!(l1))).check(Has(json!("/plant-2"))),
        case("list as scoped", M::GET, "/cache/list", Scoped, 200)
            .check(Has(json!(l1)))
            .check(Lacks(json!("/plant-2")))
            .check(Lacks(json!("/_kalima/devices")))
            .check(Len(1)),
        case("keys", M::GET, "/cache/keys?address=/plant-1/line-1", Scoped, 200)
            .check(Eq("", json!(["pressure", "temp"]))),
        case("keys forbidden", M::GET, "/cache/keys?address=/plant-2", Scoped, 406).code("forbidden"),
        case("cache", M::GET, "/cache?address=/plant-1/line-1", Scoped, 200)
            .check(Len(2))
            .check(Eq("/0/key", json!("pressure")))
            .check(Eq("/1/key", json!("temp"))),
        case("cache forbidden", M::GET, "/cache?address=/plant-2", Scoped, 406).code("forbidden"),
        case("after", M::GET, "/cache/after?address=/plant-1/line-1&n=10&seq=0", Scoped, 200).check(Seqs(vec![1, 2])),
        case("before", M::GET, "/cache/before?address=/plant-1/line-1&n=1&seq=3", Scoped, 200).check(Seqs(vec![2])),
        case("after forbidden", M::GET, "/cache/after?address=/plant-2&n=1&seq=0", Scoped, 406).code("forbidden"),
        case("before forbidden", M::GET, "/cache/before?address=/plant-2&n=1&seq=9", Scoped, 406).code("forbidden"),
        // Ledger.
        case("fromLast as admin", M::GET, "/ledger/fromLast?pageSize=1", Admin, 200)
            .check(Len(1))
            .check(Eq("/0/address", json!("/plant-2"))),
        case("fromLast as scoped", M::GET, "/ledger/fromLast?pageSize=10", Scoped, 200)
            .check(Len(2))
            .check(AllUnder("/plant-1")),
        case("between as scoped", M::GET, "/ledger/betweenSequences?start=0&end=1000&pageSize=10", Scoped, 200)
            .check(Seqs(vec![1, 2]))
            .check(AllUnder("/plant-1")),
        case("bySequence 0 (a device registration) as scoped", M::GET, "/ledger/bySequence?sequence=0", Scoped, 406)
            .code("forbidden"),
        case("bySequence 0 as admin", M::GET, "/ledger/bySequence?sequence=0", Admin, 200)
            .check(Eq("/globalSequence", json!(0))),
        // Move, then deletes.
        case("move forbidden", M::POST, "/transaction/move", Scoped, 406)
            .body(json!({ "fromAddress": l1, "toAddress": "/plant-1/line-2", "key": "pressure" }))
            .code("forbidden"),
        case("move", M::POST, "/transaction/move", Admin, 200)
            .body(json!({ "fromAddress": l1, "toAddress": "/plant-1/line-2", "key": "pressure" }))
            .check(Eq("/address", json!("/plant-1/line-2")))
            .check(Eq("/body", json!(b64("1013")))),
        case("moved value is gone", M::GET, "/transaction?address=/plant-1/line-1&key=pressure", Admin, 406)
            .code("not_found"),
        case("move of nothing", M::POST, "/transaction/move", Admin, 406)
            .body(json!({ "fromAddress": l1, "toAddress": "/plant-1/line-2", "key": "pressure" }))
            .code("not_found"),
        case("delete key forbidden", M::DELETE, "/transaction?address=/plant-1/line-1&key=temp", Scoped, 406)
            .code("forbidden"),
        case("delete key", M::DELETE, "/transaction?address=/plant-1/line-1&key=temp", Admin, 200)
            .check(Eq("/body", json!("")))
            .check(Eq("/key", json!("temp"))),
        case("delete address forbidden", M::DELETE, "/transaction?address=/plant-2", Scoped, 406).code("forbidden"),
        case("delete address", M::DELETE, "/transaction?address=/plant-2", Admin, 200).check(Len(1)),
        case("delete empty address", M::DELETE, "/transaction?address=/plant-2", Admin, 406).code("not_found"),
        case("list after deletes", M::GET, "/cache/list", Admin, 200)
            .check(Lacks(json!(l1)))
            .check(Lacks(json!("/plant-2")))
            .check(Has(json!("/plant-1/line-2"))),
        // Authentication and Kalima's 405.
        case("unknown token", M::GET, "/cache/list", Stranger, 406).code("unknown_device"),
        case("no token", M::GET, "/cache/list", Anonymous, 406).code("unknown_device"),
        case("unknown token write", M::POST, "/transaction", Stranger, 406)
            .body(put(l1, "temp", "1"))
            .code("unknown_device"),
        case("unknown path", M::GET, "/nope", Admin, 405).code("unknown_request"),
        case("unknown method", M::PUT, "/transaction", Admin, 405).code("unknown_request"),
    ])
    .await;
    k.stop().await;
}

#[tokio::test]
async fn compat_post_reads_back_with_kalima_fields_and_date_time() {
    let k = Kalima::new().await;
    let first = k.post("/plant-1/a", "temp", "21.5").await;
    let second = k.post("/plant-1/a", "temp", "{\"v\":22}").await;
    let fields = ["address", "key", "globalSequence", "sequence", "previous", "body", "hash", "props", "date", "time"];
    let mut keys: Vec<&str> = second.as_object().expect("object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = fields.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "{second}");
    assert_eq!(first["previous"], json!(0));
    assert_eq!(second["previous"], first["sequence"], "previous is the sequence before at this address");
    assert_eq!(second["sequence"], json!(2));
    let props = props_of(&second);
    assert_eq!(props.get("ttl").map(String::as_str), Some("-1"), "{props:?}");
    assert_eq!(props.get("date"), second["date"].as_str().map(str::to_string).as_ref());
    assert_eq!(props.get("time"), second["time"].as_str().map(str::to_string).as_ref());
    assert_eq!(B64.decode(second["hash"].as_str().expect("hash")).expect("base64").len(), 32);

    let read = k.get("/transaction?address=/plant-1/a&key=temp", Who::Scoped).await;
    assert_eq!(read, second, "the committed answer is what a read returns");
    let bytes = B64.decode(read["body"].as_str().expect("body")).expect("base64");
    assert_eq!(bytes, b"{\"v\":22}");

    let cache = k.get("/cache?address=/plant-1/a", Who::Admin).await;
    assert_eq!(cache, json!([second]));

    // Same transaction as /api/v1, and date/time are its timestamp in UTC.
    let hash = hex_id(&second["hash"]);
    let (s, v1) = k.node.call(Method::GET, &format!("/api/v1/tx/{hash}"), Some(&k.node.admin), None).await;
    assert_eq!(s, StatusCode::OK, "{v1}");
    let t = &v1["transaction"];
    assert_eq!(t["global_sequence"], second["globalSequence"]);
    assert_eq!(t["sequence"], second["sequence"]);
    assert_eq!(t["previous"], json!(hex_id(&first["hash"])), "the chain link is the first write");
    assert_eq!(t["body_b64"], second["body"]);
    let (date, time) = expected_date_time(t["timestamp_ms"].as_i64().expect("timestamp"));
    assert_eq!(second["date"], json!(date));
    assert_eq!(second["time"], json!(time));
    for f in ["date", "time"] {
        let s = second[f].as_str().expect("string");
        assert!(s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()), "{f} = {s}");
    }

    // An empty body deletes, as in Kalima.
    let deleted = k.post("/plant-1/a", "temp", "").await;
    assert_eq!(deleted["body"], json!(""));
    assert_eq!(deleted["previous"], second["sequence"]);
    let (s, v) = k.send(Method::GET, "/transaction?address=/plant-1/a&key=temp", Who::Admin, None).await;
    assert_eq!((s, &v["code"]), (StatusCode::NOT_ACCEPTABLE, &json!("not_found")), "{v}");
    k.stop().await;
}

#[tokio::test]
async fn compat_cache_after_and_before_page_by_address_sequence() {
    let k = Kalima::new().await;
    for i in 1..=5 {
        k.post("/plant-1/seq", &format!("k{i}"), &i.to_string()).await;
        // Another address in between: per-address sequences stay 1..=5.
        k.post("/plant-1/other", "x", &i.to_string()).await;
    }
    use Check::*;
    use Method as M;
    use Who::*;
    let a = "/cache/after?address=/plant-1/seq";
    let b = "/cache/before?address=/plant-1/seq";
    k.run(vec![
        case("after 2, n 2", M::GET, &format!("{a}&n=2&seq=2"), Scoped, 200).check(Seqs(vec![3, 4])),
        case("after 4, n 10", M::GET, &format!("{a}&n=10&seq=4"), Scoped, 200).check(Seqs(vec![5])),
        case("after 5", M::GET, &format!("{a}&n=10&seq=5"), Scoped, 200).check(Len(0)),
        case("after, no seq", M::GET, &format!("{a}&n=2"), Scoped, 200).check(Seqs(vec![1, 2])),
        case("after, defaults", M::GET, a, Scoped, 200).check(Seqs(vec![1, 2, 3, 4, 5])),
        case("before 4, n 2", M::GET, &format!("{b}&n=2&seq=4"), Scoped, 200).check(Seqs(vec![3, 2])),
        case("before, no seq", M::GET, &format!("{b}&n=2"), Scoped, 200).check(Seqs(vec![5, 4])),
        case("before 1", M::GET, &format!("{b}&n=2&seq=1"), Scoped, 200).check(Len(0)),
        case("bodies ride along", M::GET, &format!("{a}&n=1&seq=2"), Scoped, 200)
            .check(Eq("/0/key", json!("k3")))
            .check(Eq("/0/body", json!(b64("3")))),
        case("n 0", M::GET, &format!("{a}&n=0"), Scoped, 406).code("invalid_query"),
        case("n too big", M::GET, &format!("{a}&n=1001"), Scoped, 406).code("invalid_query"),
        case("n not a number", M::GET, &format!("{a}&n=many"), Scoped, 406).code("invalid_query"),
        case("negative seq", M::GET, &format!("{b}&seq=-1"), Scoped, 406).code("invalid_query"),
        case("no address", M::GET, "/cache/after?n=1", Scoped, 406).code("invalid_query"),
        case("bad address", M::GET, "/cache/after?address=plant", Scoped, 406).code("invalid_address"),
    ])
    .await;
    k.stop().await;
}

#[tokio::test]
async fn compat_ledger_matches_api_v1() {
    let k = Kalima::new().await;
    let w = [
        k.post("/plant-1/a", "t", "1").await,
        k.post("/plant-2/b", "t", "2").await,
        k.post("/plant-1/c", "t", "3").await,
    ];
    let gs: Vec<u64> = w.iter().map(|t| t["globalSequence"].as_u64().expect("gs")).collect();
    assert_eq!(gs, vec![gs[0], gs[0] + 1, gs[0] + 2], "consecutive writes are consecutive in the ledger");
    for t in &w {
        let hash = hex_id(&t["hash"]);
        let (s, v1) = k.node.call(Method::GET, &format!("/api/v1/tx/{hash}"), Some(&k.node.admin), None).await;
        assert_eq!(s, StatusCode::OK, "{v1}");
        assert_eq!(v1["transaction"]["global_sequence"], t["globalSequence"]);
        assert_eq!(v1["transaction"]["address"], t["address"]);
        let by_seq = k.get(&format!("/ledger/bySequence?sequence={}", t["globalSequence"]), Who::Admin).await;
        assert_eq!(&by_seq, t);
    }
    let hashes = |v: &Value| -> Vec<Value> { v.as_array().expect("array").iter().map(|t| t["hash"].clone()).collect() };
    let h: Vec<Value> = w.iter().map(|t| t["hash"].clone()).collect();

    let all = k.get(&format!("/ledger/betweenSequences?start={}&end={}&pageSize=10", gs[0], gs[2]), Who::Admin).await;
    assert_eq!(hashes(&all), h, "start and end are inclusive");
    let page = k.get(&format!("/ledger/betweenSequences?start={}&end={}&pageSize=2", gs[0], gs[2]), Who::Admin).await;
    assert_eq!(hashes(&page), h[..2].to_vec());
    let last = k.get("/ledger/fromLast?pageSize=3", Who::Admin).await;
    assert_eq!(hashes(&last), vec![h[2].clone(), h[1].clone(), h[0].clone()], "newest first");
    let default = k.get("/ledger/fromLast", Who::Admin).await;
    assert_eq!(default.as_array().map(Vec::len), Some(gs[2] as usize + 1), "default page holds the whole short chain");

    // The scoped device sees only /plant-1, and still gets full pages when it can.
    let scoped =
        k.get(&format!("/ledger/betweenSequences?start={}&end={}&pageSize=2", gs[0], gs[2]), Who::Scoped).await;
    assert_eq!(hashes(&scoped), vec![h[0].clone(), h[2].clone()]);
    let scoped_last = k.get("/ledger/fromLast?pageSize=1", Who::Scoped).await;
    assert_eq!(hashes(&scoped_last), vec![h[2].clone()]);
    let (s, v) = k.send(Method::GET, &format!("/ledger/bySequence?sequence={}", gs[1]), Who::Scoped, None).await;
    assert_eq!((s, &v["code"]), (StatusCode::NOT_ACCEPTABLE, &json!("forbidden")), "{v}");

    use Method as M;
    use Who::*;
    k.run(vec![
        case("past the end", M::GET, "/ledger/bySequence?sequence=999999", Admin, 406).code("not_found"),
        case("no sequence", M::GET, "/ledger/bySequence", Admin, 406).code("invalid_query"),
        case("end below start", M::GET, "/ledger/betweenSequences?start=5&end=4", Admin, 406).code("invalid_query"),
        case("page 0", M::GET, "/ledger/fromLast?pageSize=0", Admin, 406).code("invalid_query"),
        case("range past the end", M::GET, "/ledger/betweenSequences?start=999990&end=999999", Admin, 200)
            .check(Check::Len(0)),
    ])
    .await;
    k.stop().await;
}

#[tokio::test]
async fn compat_delete_address_removes_every_key_in_one_commit() {
    let k = Kalima::new().await;
    for key in ["a", "b", "c"] {
        k.post("/plant-1/gone", key, "v").await;
    }
    k.post("/plant-1/kept", "a", "v").await;
    let (s, v) = k.send(Method::DELETE, "/transaction?address=/plant-1/gone", Who::Admin, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let deletes = v.as_array().expect("array");
    assert_eq!(deletes.iter().map(|t| t["key"].clone()).collect::<Vec<_>>(), vec![json!("a"), json!("b"), json!("c")]);
    let mut heights = Vec::new();
    for (i, t) in deletes.iter().enumerate() {
        assert_eq!(t["body"], json!(""));
        assert_eq!(t["globalSequence"].as_u64(), deletes[0]["globalSequence"].as_u64().map(|g| g + i as u64));
        let hash = hex_id(&t["hash"]);
        let (s, v1) = k.node.call(Method::GET, &format!("/api/v1/tx/{hash}"), Some(&k.node.admin), None).await;
        assert_eq!(s, StatusCode::OK, "{v1}");
        assert_eq!(v1["transaction"]["kind"], json!("delete"));
        heights.push(v1["transaction"]["height"].clone());
    }
    heights.dedup();
    assert_eq!(heights.len(), 1, "one commit, one block: {heights:?}");
    assert_eq!(k.get("/cache/keys?address=/plant-1/gone", Who::Scoped).await, json!([]));
    let list = k.get("/cache/list", Who::Scoped).await;
    assert_eq!(list, json!(["/plant-1/kept"]));
    k.stop().await;
}

#[tokio::test]
async fn compat_unknown_requests_answer_405_with_one_body() {
    let k = Kalima::new().await;
    let want = json!({ "error": "unknown request", "code": "unknown_request" });
    for (method, uri) in [
        (Method::GET, "/nope"),
        (Method::GET, "/transaction/extra"),
        (Method::GET, "/cache/list/"),
        (Method::PUT, "/transaction"),
        (Method::PATCH, "/cache"),
        (Method::POST, "/cache/list"),
        (Method::DELETE, "/ledger/fromLast"),
        (Method::GET, "/transaction/move"),
    ] {
        let (s, v) = k.send(method.clone(), uri, Who::Admin, None).await;
        assert_eq!((s, &v), (StatusCode::METHOD_NOT_ALLOWED, &want), "{method} {uri}");
    }
    k.stop().await;
}

#[tokio::test]
async fn compat_rejected_writes_are_406_and_counted() {
    let k = Kalima::new().await;
    k.post("/plant-1/a", "temp", "1").await;
    struct Reject {
        name: &'static str,
        method: Method,
        uri: &'static str,
        who: Who,
        body: Option<String>,
        code: &'static str,
        mentions: &'static str,
    }
    let raw = |name, method, uri, who, body: &str, code, mentions| Reject {
        name,
        method,
        uri,
        who,
        body: Some(body.to_string()),
        code,
        mentions,
    };
    let cases = [
        raw(
            "bad base64",
            Method::POST,
            "/transaction",
            Who::Admin,
            r#"{"address":"/plant-1/a","key":"temp","body":"not base64!"}"#,
            "malformed",
            "body",
        ),
        raw("malformed JSON", Method::POST, "/transaction", Who::Admin, "{not json", "malformed", ""),
        raw(
            "missing body field",
            Method::POST,
            "/transaction",
            Who::Admin,
            r#"{"address":"/plant-1/a","key":"temp"}"#,
            "malformed",
            "body",
        ),
        raw(
            "invalid key",
            Method::POST,
            "/transaction",
            Who::Admin,
            r#"{"address":"/plant-1/a","key":"a#b","body":"MQ=="}"#,
            "invalid_key",
            "key",
        ),
        raw(
            "invalid address",
            Method::POST,
            "/transaction",
            Who::Admin,
            r#"{"address":"plant","key":"k","body":"MQ=="}"#,
            "invalid_address",
            "address",
        ),
        raw(
            "ttl too long",
            Method::POST,
            "/transaction",
            Who::Admin,
            r#"{"address":"/plant-1/a","key":"k","body":"MQ==","ttl":99999999999}"#,
            "invalid_field",
            "ttl",
        ),
        raw(
            "missing grant",
            Method::POST,
            "/transaction",
            Who::Scoped,
            r#"{"address":"/plant-1/a","key":"temp","body":"MQ=="}"#,
            "forbidden",
            "write",
        ),
        raw(
            "unknown token",
            Method::POST,
            "/transaction",
            Who::Stranger,
            r#"{"address":"/plant-1/a","key":"temp","body":"MQ=="}"#,
            "unknown_device",
            "",
        ),
        raw(
            "move, invalid key",
            Method::POST,
            "/transaction/move",
            Who::Admin,
            r#"{"fromAddress":"/plant-1/a","toAddress":"/plant-1/b","key":"a#b"}"#,
            "invalid_key",
            "key",
        ),
        raw(
            "move, malformed",
            Method::POST,
            "/transaction/move",
            Who::Admin,
            r#"{"from":"/plant-1/a"}"#,
            "malformed",
            "fromAddress",
        ),
        Reject {
            name: "delete key, missing grant",
            method: Method::DELETE,
            uri: "/transaction?address=/plant-1/a&key=temp",
            who: Who::Scoped,
            body: None,
            code: "forbidden",
            mentions: "write",
        },
        Reject {
            name: "delete address, no read grant",
            method: Method::DELETE,
            uri: "/transaction?address=/plant-2",
            who: Who::Scoped,
            body: None,
            code: "forbidden",
            mentions: "read",
        },
        Reject {
            name: "delete, invalid key",
            method: Method::DELETE,
            uri: "/transaction?address=/plant-1/a&key=a%23b",
            who: Who::Admin,
            body: None,
            code: "invalid_key",
            mentions: "key",
        },
        Reject {
            name: "delete, no address",
            method: Method::DELETE,
            uri: "/transaction?key=temp",
            who: Who::Admin,
            body: None,
            code: "malformed",
            mentions: "address",
        },
    ];
    for c in cases {
        let before = rejected(&k.node.metrics().await, c.code);
        let (s, v) = k.node.call_raw(c.method.clone(), c.uri, k.authorization(c.who), c.body.clone()).await;
        let name = c.name;
        assert_eq!(s, StatusCode::NOT_ACCEPTABLE, "{name}: {v}");
        assert_eq!(v["code"], json!(c.code), "{name}: {v}");
        let message = v["error"].as_str().unwrap_or_else(|| panic!("{name}: no message: {v}"));
        assert!(message.contains(c.mentions), "{name}: {message:?} should mention {:?}", c.mentions);
        let after = rejected(&k.node.metrics().await, c.code);
        assert!(
            after >= before + 1.0,
            "{name}: kalima_writes_rejected_total{{reason=\"{}\",interface=\"kalima_rest\"}} went {before} -> {after}",
            c.code
        );
    }
    // Nothing of the above was written.
    let v = k.get("/transaction?address=/plant-1/a&key=temp", Who::Admin).await;
    assert_eq!(v["body"], json!(b64("1")));
    assert_eq!(k.get("/cache/keys?address=/plant-1/a", Who::Admin).await, json!(["temp"]));
    k.stop().await;
}

/// A moved value keeps its props and records where it came from, inside Kalima's props text.
#[tokio::test]
async fn compat_move_records_its_origin_in_props() {
    let k = Kalima::new().await;
    k.post("/plant-1/a", "gauge", "7").await;
    let body = json!({ "fromAddress": "/plant-1/a", "toAddress": "/plant-1/b", "key": "gauge" });
    let (s, moved) = k.send(Method::POST, "/transaction/move", Who::Admin, Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{moved}");
    assert_eq!(moved["address"], json!("/plant-1/b"));
    assert_eq!(props_of(&moved).get("moved_from").map(String::as_str), Some("/plant-1/a"));
    k.stop().await;
}
