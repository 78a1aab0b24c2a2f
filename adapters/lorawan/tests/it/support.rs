//! Shared harness: the independent LoRaWAN frame peer (`tests/peers/lora_frames.js` on the npm
//! package lora-packet), a test gateway that speaks the Semtech UDP packet-forwarder protocol v2
//! to the adapter, a chain on a fresh SQLite file with the adapter's Kalima device registered, and
//! polling helpers that wait for behaviour rather than for fixed times.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kalima_adapter_lorawan::{LorawanAdapter, LorawanSection};
use kalima_core::CommittedTx;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

/// How long any awaited behaviour may take before the test fails; generous, since the machine
/// may be busy building other crates. Tests never assert that something is fast.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`; panics after [`PATIENCE`] with `what` and `describe`.
pub(crate) async fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>, describe: impl Fn() -> String) -> T {
    kalima_core::testing::wait_for(PATIENCE, what, check, describe).await
}

pub(crate) use kalima_core::testing::{body_json, json_close};

const INSTALL_HINT: &str = "run scripts/peers/install from the workspace root";

// ----------------------------------------------------------------------------------------
// Waiting.

/// Absence cannot be awaited, so negative checks run after a later frame (a barrier) has been
/// committed: the adapter handles frames in arrival order, and anything a refused frame would
/// have caused was started before the barrier's commit. This grace covers the few spawned tasks
/// (chain write, downlink send) that might still be in flight at that moment.
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// ----------------------------------------------------------------------------------------
// Configuration.

/// Gateways of the allow-list.
pub(crate) const GW1: &str = "AA555A0000000101";
pub(crate) const GW2: &str = "AA555A0000000102";
pub(crate) const GW3: &str = "AA555A0000000103";

/// An ABP device of the test config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Abp {
    pub(crate) dev_eui: &'static str,
    pub(crate) dev_addr: &'static str,
    pub(crate) nwk_skey: &'static str,
    pub(crate) app_skey: &'static str,
    pub(crate) address: &'static str,
}

/// Cayenne LPP soil sensor.
pub(crate) const SOIL: Abp = Abp {
    dev_eui: "0004A30B001C0530",
    dev_addr: "26011BDA",
    nwk_skey: "2B7E151628AED2A6ABF7158809CF4F3C",
    app_skey: "000102030405060708090A0B0C0D0E0F",
    address: "/farm/soil-1",
};

/// `fields` water valve.
pub(crate) const VALVE: Abp = Abp {
    dev_eui: "0004A30B001C0777",
    dev_addr: "26011BDB",
    nwk_skey: "3C4FCF098815F7ABA6D2AE2816157E2B",
    app_skey: "0F0E0D0C0B0A09080706050403020100",
    address: "/plant-1/water/valve-2",
};

/// `raw` tracker.
pub(crate) const TRACKER: Abp = Abp {
    dev_eui: "0004A30B001C0999",
    dev_addr: "26011C00",
    nwk_skey: "11111111111111111111111111111111",
    app_skey: "22222222222222222222222222222222",
    address: "/fleet/tracker-3",
};

/// An OTAA device of the test config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Otaa {
    pub(crate) dev_eui: &'static str,
    pub(crate) app_eui: &'static str,
    pub(crate) app_key: &'static str,
    pub(crate) address: &'static str,
}

/// `fields` water meter (the example config's).
pub(crate) const METER: Otaa = Otaa {
    dev_eui: "70B3D5499D4A0007",
    app_eui: "70B3D57ED0000000",
    app_key: "B6B53F4A168A7A88BDF7EA135CE9CFCA",
    address: "/plant-1/water/meter-7",
};

/// The device of The Things Network's published join-request example, `raw` codec.
pub(crate) const TTN: Otaa = Otaa {
    dev_eui: "00AFEE7CF5ED6F1E",
    app_eui: "70B3D57ED00000DC",
    app_key: "B6B53F4A168A7A88BDF7EA135CE9CFCA",
    address: "/lab/ttn-node",
};

/// NetID of the test network: its low 7 bits (0x13) must head every DevAddr handed out.
pub(crate) const NET_ID: &str = "000013";

/// `[[lorawan.devices.fields]]` of the water devices: a meter reading, the battery, two flags.
const WATER_FIELDS: &str = r#"
    [[lorawan.devices.fields]]
    name = "volume"
    offset = 0
    type = "u32"
    scale = 0.001
    unit = "m3"

    [[lorawan.devices.fields]]
    name = "battery"
    offset = 4
    type = "u8"
    scale = 0.02
    unit = "V"

    [[lorawan.devices.fields]]
    name = "leak"
    offset = 5
    type = "bool"
    bit = 0

    [[lorawan.devices.fields]]
    name = "tamper"
    offset = 5
    type = "bool"
    bit = 1
"#;

fn abp_toml(name: &str, d: Abp, codec: &str, fields: &str) -> String {
    format!(
        r#"
        [[lorawan.devices]]
        name = "{name}"
        dev_eui = "{}"
        activation = "abp"
        dev_addr = "{}"
        nwk_skey = "{}"
        app_skey = "{}"
        address = "{}"
        codec = "{codec}"
        {fields}
        "#,
        d.dev_eui, d.dev_addr, d.nwk_skey, d.app_skey, d.address
    )
}

fn otaa_toml(name: &str, d: Otaa, codec: &str, fields: &str) -> String {
    format!(
        r#"
        [[lorawan.devices]]
        name = "{name}"
        dev_eui = "{}"
        activation = "otaa"
        app_eui = "{}"
        app_key = "{}"
        address = "{}"
        codec = "{codec}"
        {fields}
        "#,
        d.dev_eui, d.app_eui, d.app_key, d.address
    )
}

/// The `[lorawan]` section of the tests, as an integrator writes it in kalima.toml; copies of
/// one uplink are gathered for `dedup_window_ms`.
pub(crate) fn config(dedup_window_ms: u64) -> LorawanSection {
    let text = [
        format!(
            r#"
            [lorawan]
            listen = "127.0.0.1:0"
            kalima_device = "lorawan"
            gateways = ["{GW1}", "{GW2}", "{GW3}"]
            net_id = "{NET_ID}"
            dedup_window_ms = {dedup_window_ms}
            downlink_power_dbm = 14
            "#
        ),
        abp_toml("soil-1", SOIL, "cayenne_lpp", ""),
        abp_toml("valve-2", VALVE, "fields", WATER_FIELDS),
        abp_toml("tracker-3", TRACKER, "raw", ""),
        otaa_toml("meter-7", METER, "fields", WATER_FIELDS),
        otaa_toml("ttn-node", TTN, "raw", ""),
    ]
    .concat();
    section(&text)
}

/// Parses a `[lorawan]` section as it appears in kalima.toml and checks it validates.
pub(crate) fn section(toml_text: &str) -> LorawanSection {
    #[derive(serde::Deserialize)]
    struct Root {
        lorawan: LorawanSection,
    }
    let root: Root =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("test config does not parse: {e}\n{toml_text}"));
    let errs = root.lorawan.validate();
    assert!(errs.is_empty(), "test config does not validate: {errs:#?}\n{toml_text}");
    root.lorawan
}

// ----------------------------------------------------------------------------------------
// The frame peer (lora-packet).

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/lora_frames.js")
}

/// Where `scripts/peers/install` puts lora-packet (the same lookup as the script's).
fn lora_packet_dir() -> PathBuf {
    let peers = std::env::var_os("KALIMA_PEERS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kalima-peers")))
        .unwrap_or_else(|| panic!("neither KALIMA_PEERS_DIR nor HOME is set: cannot find the npm peers"));
    peers.join("npm/node_modules/lora-packet")
}

/// Runs one command of `lora_frames.js`; fails (never skips) when node or lora-packet is missing.
pub(crate) async fn lora(request: Value) -> Value {
    let lib = lora_packet_dir();
    assert!(
        lib.join("package.json").is_file(),
        "the LoRaWAN frame peer needs the npm package lora-packet, not found at {}: {INSTALL_HINT} \
         (or point KALIMA_PEERS_DIR at the peers directory)",
        lib.display()
    );
    let mut child = tokio::process::Command::new("node")
        .arg(peer_script())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): the LoRaWAN frame peer needs Node.js; {INSTALL_HINT}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(request.to_string().as_bytes()).await.expect("write the peer's stdin");
    drop(stdin);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("lora_frames.js did not answer {request} within {PATIENCE:?}"))
        .expect("wait for lora_frames.js");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "lora_frames.js answered {request} with non-JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(err) = answer.get("error") {
        if err.as_str().is_some_and(|e| e.contains("cannot load lora-packet")) {
            panic!("the LoRaWAN frame peer cannot load lora-packet: {err}; {INSTALL_HINT}");
        }
        panic!("lora_frames.js refused {request}: {err}");
    }
    assert!(out.status.success(), "lora_frames.js exited with {} on {request}: {stdout}", out.status);
    answer
}

pub(crate) fn phy_of(answer: &Value) -> Vec<u8> {
    let b64 = answer["phy"].as_str().unwrap_or_else(|| panic!("no phy in {answer}"));
    B64.decode(b64).unwrap_or_else(|e| panic!("phy of {answer} is not base64: {e}"))
}

/// Session keys of a device, hex as printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) dev_addr: String,
    pub(crate) nwk_skey: String,
    pub(crate) app_skey: String,
}

impl From<Abp> for Keys {
    fn from(d: Abp) -> Keys {
        Keys { dev_addr: d.dev_addr.into(), nwk_skey: d.nwk_skey.into(), app_skey: d.app_skey.into() }
    }
}

/// An unconfirmed data uplink built by lora-packet (the full counter goes into the MIC and the
/// encryption; the frame carries its low 16 bits).
pub(crate) async fn uplink(keys: impl Into<Keys>, fcnt: u32, fport: u8, payload_hex: &str) -> Vec<u8> {
    let k = keys.into();
    phy_of(
        &lora(json!({
            "cmd": "uplink",
            "dev_addr": k.dev_addr,
            "nwk_skey": k.nwk_skey,
            "app_skey": k.app_skey,
            "fcnt": fcnt,
            "fport": fport,
            "payload": payload_hex,
            "confirmed": false,
        }))
        .await,
    )
}

/// A join request built by lora-packet.
pub(crate) async fn join_request(device: Otaa, dev_nonce: &str) -> Vec<u8> {
    phy_of(
        &lora(json!({
            "cmd": "join_request",
            "app_eui": device.app_eui,
            "dev_eui": device.dev_eui,
            "dev_nonce": dev_nonce,
            "app_key": device.app_key,
        }))
        .await,
    )
}

/// What a device learns from a join accept, as lora-packet decodes it.
pub(crate) async fn join_accept_decode(phy: &[u8], app_key: &str, dev_nonce: &str) -> Value {
    lora(json!({
        "cmd": "join_accept_decode",
        "phy": B64.encode(phy),
        "app_key": app_key,
        "dev_nonce": dev_nonce,
    }))
    .await
}

/// The session a decoded join accept gives the device.
pub(crate) fn keys_of(decoded: &Value) -> Keys {
    let s = |k: &str| decoded[k].as_str().unwrap_or_else(|| panic!("no {k} in {decoded}")).to_string();
    Keys { dev_addr: s("dev_addr"), nwk_skey: s("nwk_skey"), app_skey: s("app_skey") }
}

// ----------------------------------------------------------------------------------------
// The test gateway (Semtech UDP packet forwarder, protocol v2).

/// PUSH_DATA.
pub(crate) const PUSH_DATA: u8 = 0;
/// PUSH_ACK.
pub(crate) const PUSH_ACK: u8 = 1;
/// PULL_DATA.
pub(crate) const PULL_DATA: u8 = 2;
/// PULL_RESP.
pub(crate) const PULL_RESP: u8 = 3;
/// PULL_ACK.
pub(crate) const PULL_ACK: u8 = 4;

/// One `rxpk` entry as a gateway reports a frame it received with a good CRC.
pub(crate) fn rxpk(phy: &[u8], rssi: i32) -> Value {
    json!({
        "tmst": 1_000_000u32,
        "chan": 0,
        "rfch": 0,
        "freq": 868.1,
        "stat": 1,
        "modu": "LORA",
        "datr": "SF7BW125",
        "codr": "4/5",
        "rssi": rssi,
        "lsnr": 7.5,
        "size": phy.len(),
        "data": B64.encode(phy),
    })
}

/// A gateway on its own UDP socket; everything the adapter sends it is kept in `inbox`.
/// Its receiver stops on drop.
pub(crate) struct Gateway {
    /// EUI, 16 hex digits.
    pub(crate) eui: String,
    eui_bytes: [u8; 8],
    socket: Arc<UdpSocket>,
    server: SocketAddr,
    inbox: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    next_token: AtomicU16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// A gateway with EUI `eui` that talks to the adapter at `server`.
    pub(crate) async fn new(eui: &str, server: SocketAddr) -> Gateway {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind the gateway's socket"));
        let inbox = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (s, sink) = (socket.clone(), inbox.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, _)) = s.recv_from(&mut buf).await {
                sink.lock().push(buf[..n].to_vec());
            }
        });
        let eui_bytes: [u8; 8] = hex::decode(eui).expect("EUI hex").try_into().expect("EUI of 8 bytes");
        // Tokens differ between gateways and have a non-zero high byte, so an echo is checked
        // byte for byte.
        let first = u16::from_be_bytes([0xA0 | eui_bytes[7], eui_bytes[7]]);
        Gateway { eui: eui.into(), eui_bytes, socket, server, inbox, next_token: AtomicU16::new(first), task }
    }

    /// Points the gateway at a (restarted) adapter.
    pub(crate) fn retarget(&mut self, server: SocketAddr) {
        self.server = server;
    }

    fn token(&self) -> u16 {
        self.next_token.fetch_add(0x0101, Ordering::SeqCst)
    }

    /// Sends bytes as they are.
    pub(crate) async fn send_raw(&self, datagram: &[u8]) {
        self.socket.send_to(datagram, self.server).await.expect("send a datagram to the adapter");
    }

    /// `[2][token][kind][EUI]` and the body.
    fn datagram(&self, token: u16, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut d = vec![2];
        d.extend_from_slice(&token.to_be_bytes());
        d.push(kind);
        d.extend_from_slice(&self.eui_bytes);
        d.extend_from_slice(body);
        d
    }

    /// Sends PUSH_DATA with `rxpk` and returns its token, without waiting for the ACK.
    pub(crate) async fn push(&self, rxpk: Vec<Value>) -> u16 {
        let token = self.token();
        let body = json!({ "rxpk": rxpk }).to_string();
        self.send_raw(&self.datagram(token, PUSH_DATA, body.as_bytes())).await;
        token
    }

    /// Sends PUSH_DATA with a body as given (possibly broken) and returns its token.
    pub(crate) async fn push_body(&self, body: &[u8]) -> u16 {
        let token = self.token();
        self.send_raw(&self.datagram(token, PUSH_DATA, body)).await;
        token
    }

    /// Sends PUSH_DATA and waits for the PUSH_ACK that echoes its token.
    pub(crate) async fn push_acked(&self, rxpk: Vec<Value>) -> u16 {
        let token = self.push(rxpk).await;
        self.expect_ack(token, PUSH_ACK).await;
        token
    }

    /// Sends one frame with good CRC, waits for the PUSH_ACK.
    pub(crate) async fn uplink(&self, phy: &[u8], rssi: i32) {
        self.push_acked(vec![rxpk(phy, rssi)]).await;
    }

    /// Sends PULL_DATA (opening the downlink path) and waits for the PULL_ACK.
    pub(crate) async fn pull(&self) {
        let token = self.token();
        self.send_raw(&self.datagram(token, PULL_DATA, &[])).await;
        self.expect_ack(token, PULL_ACK).await;
    }

    /// Waits for `[2][token][kind]` (exactly 4 bytes) and removes it from the inbox.
    pub(crate) async fn expect_ack(&self, token: u16, kind: u8) {
        let t = token.to_be_bytes();
        let want = [2, t[0], t[1], kind];
        wait_for(
            &format!("gateway {}: ACK {want:02x?}", self.eui),
            || self.take(|d| d == want),
            || format!("inbox: {:02x?}", self.inbox.lock()),
        )
        .await;
    }

    /// Whether an ACK of `kind` for `token` has arrived.
    pub(crate) fn has_ack(&self, token: u16, kind: u8) -> bool {
        let t = token.to_be_bytes();
        self.inbox.lock().iter().any(|d| d.get(1..4) == Some(&[t[0], t[1], kind][..]))
    }

    /// Removes and returns the first received datagram that satisfies `pred`.
    pub(crate) fn take(&self, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let mut inbox = self.inbox.lock();
        let i = inbox.iter().position(|d| pred(d))?;
        Some(inbox.remove(i))
    }

    /// PULL_RESP datagrams received and not yet taken.
    pub(crate) fn pull_resps(&self) -> Vec<Vec<u8>> {
        self.inbox.lock().iter().filter(|d| d.get(3) == Some(&PULL_RESP)).cloned().collect()
    }

    /// Waits for a PULL_RESP and returns its `txpk`.
    pub(crate) async fn expect_pull_resp(&self) -> Value {
        let d = wait_for(
            &format!("gateway {}: a PULL_RESP", self.eui),
            || self.take(|d| d.get(3) == Some(&PULL_RESP)),
            || format!("inbox: {:02x?}", self.inbox.lock()),
        )
        .await;
        assert_eq!(d[0], 2, "PULL_RESP must answer in the gateway's protocol version: {d:02x?}");
        let body: Value = serde_json::from_slice(&d[4..])
            .unwrap_or_else(|e| panic!("PULL_RESP body is not JSON ({e}): {}", String::from_utf8_lossy(&d[4..])));
        body.get("txpk").cloned().unwrap_or_else(|| panic!("PULL_RESP without txpk: {body}"))
    }
}

/// The PHYPayload a `txpk` carries, checked against its `size`.
pub(crate) fn txpk_phy(txpk: &Value) -> Vec<u8> {
    let data = txpk["data"].as_str().unwrap_or_else(|| panic!("txpk without data: {txpk}"));
    let phy = B64.decode(data).unwrap_or_else(|e| panic!("txpk data is not standard base64 ({e}): {txpk}"));
    assert_eq!(txpk["size"].as_u64(), Some(phy.len() as u64), "txpk size must match its data: {txpk}");
    phy
}

// ----------------------------------------------------------------------------------------
// The chain.

/// Chain name used by every test.
pub(crate) const CHAIN: &str = "kalima-it";

/// A chain on a fresh SQLite file, with its ingest (shared harness plus this crate's helpers).
pub(crate) struct Node(kalima_core::testing::TestChain);

impl std::ops::Deref for Node {
    type Target = kalima_core::testing::TestChain;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Node {
    /// Genesis registers the admin device, as `kalima init` does.
    pub(crate) async fn start() -> Node {
        Node(kalima_core::testing::TestChain::start(CHAIN).await)
    }

    /// The frame counters of every transaction of `address`/`key`, oldest first.
    pub(crate) async fn fcnts(&self, address: &str, key: &str) -> Vec<u32> {
        let mut v: Vec<u32> = self.history(address, key).await.iter().map(fcnt_of).collect();
        v.reverse();
        v
    }

    /// Waits until the latest `address`/`key` is the uplink with counter `fcnt`.
    pub(crate) async fn wait_fcnt(&self, address: &str, key: &str, fcnt: u32) -> Arc<CommittedTx> {
        wait_for(
            &format!("{address}/{key} from the uplink with FCnt {fcnt}"),
            || self.latest(address, key).filter(|c| fcnt_of(c) == fcnt),
            || format!("{:#?}", self.latest(address, key).map(|c| c.tx.content.props.clone())),
        )
        .await
    }
}

/// The `lorawan_fcnt` prop of a committed uplink.
pub(crate) fn fcnt_of(c: &CommittedTx) -> u32 {
    prop(c, "lorawan_fcnt").parse().unwrap_or_else(|e| panic!("lorawan_fcnt is not a number: {e}"))
}

/// A prop of a committed transaction; panics naming the props when it is missing.
pub(crate) fn prop<'a>(c: &'a CommittedTx, name: &str) -> &'a str {
    c.tx.content.props.get(name).unwrap_or_else(|| panic!("no prop {name:?} in {:#?}", c.tx.content.props))
}

// ----------------------------------------------------------------------------------------
// The adapter on the chain.

/// A chain, the adapter's Kalima device with write grants on the test addresses, and the adapter.
pub(crate) struct Harness {
    pub(crate) node: Node,
    pub(crate) section: LorawanSection,
    adapter: Option<LorawanAdapter>,
}

impl Harness {
    pub(crate) async fn start(section: LorawanSection) -> Harness {
        let node = Node::start().await;
        node.register(
            &section.kalima_device,
            &[("/farm", true, true), ("/plant-1", true, true), ("/fleet", true, true), ("/lab", true, true)],
        )
        .await;
        let mut h = Harness { node, section, adapter: None };
        h.start_adapter().await;
        h
    }

    /// Where the adapter keeps OTAA sessions.
    pub(crate) fn sessions_path(&self) -> PathBuf {
        self.node.dir().join("lorawan-sessions.json")
    }

    async fn start_adapter(&mut self) {
        let adapter = LorawanAdapter::start(&self.section, self.node.ingest.clone(), Some(self.sessions_path()))
            .await
            .expect("start the LoRaWAN adapter");
        self.adapter = Some(adapter);
    }

    /// Where gateways send.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.adapter.as_ref().expect("a running adapter").local_addr()
    }

    /// A gateway talking to the adapter.
    pub(crate) async fn gateway(&self, eui: &str) -> Gateway {
        Gateway::new(eui, self.addr()).await
    }

    /// Drops the adapter and starts a new one on the same chain and sessions file, as a node
    /// restart does.
    pub(crate) async fn restart(&mut self) {
        drop(self.adapter.take());
        self.start_adapter().await;
    }
}
