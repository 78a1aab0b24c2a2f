//! Shared harness: the Modbus server peer (pymodbus) on TCP or on one end of a socat
//! pseudo-terminal pair, a silent TCP listener and a refused port, a chain on a fresh SQLite
//! file with devices and grants, a direct Modbus client to look at registers behind the
//! adapter's back, and polling helpers that wait for behaviour rather than for fixed times.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kalima_adapter_modbus::{DeviceStatus, ModbusAdapter, ModbusSection};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;

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

/// The status of device `name`; panics when the adapter has no such device.
pub(crate) fn status(adapter: &ModbusAdapter, name: &str) -> DeviceStatus {
    adapter
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("adapter has no device {name:?}: {:#?}", adapter.status()))
}

/// Waits until the status of `name` satisfies `cond`, then returns it; on timeout the
/// panic shows every device's status.
pub(crate) async fn wait_status(
    adapter: &ModbusAdapter,
    name: &str,
    what: &str,
    cond: impl Fn(&DeviceStatus) -> bool,
) -> DeviceStatus {
    wait_for(
        &format!("device {name:?}: {what}"),
        || Some(status(adapter, name)).filter(|s| cond(s)),
        || format!("{:#?}", adapter.status()),
    )
    .await
}

// ----------------------------------------------------------------------------------------
// Configuration.

/// Parses a `[modbus]` section as it appears in kalima.toml and checks it validates.
pub(crate) fn section(toml_text: &str) -> ModbusSection {
    #[derive(serde::Deserialize)]
    struct Root {
        modbus: ModbusSection,
    }
    let root: Root =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("test config does not parse: {e}\n{toml_text}"));
    let errs = root.modbus.validate();
    assert!(errs.is_empty(), "test config does not validate: {errs:#?}\n{toml_text}");
    root.modbus
}

// ----------------------------------------------------------------------------------------
// Peers.

/// The Python of the peers' virtualenv; fails (never skips) when it is not installed.
fn peers_python() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("KALIMA_PEERS_VENV").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(v));
    } else {
        if let Some(d) = std::env::var_os("KALIMA_PEERS_DIR").filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(d).join("venv"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(h).join(".cache/kalima-peers/venv"));
        }
    }
    let tried: Vec<PathBuf> = candidates.iter().map(|v| v.join("bin/python")).collect();
    tried.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "the Modbus server peer needs the peers' Python virtualenv with pymodbus, not found at {tried:?}: \
             {INSTALL_HINT} (or point KALIMA_PEERS_VENV at the venv)"
        )
    })
}

fn sim_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/modbus_sim.py")
}

/// Collects a child's stderr (for failure messages) and echoes it to the test's stderr.
fn collect_stderr(
    name: &'static str,
    pipe: impl AsyncRead + Unpin + Send + 'static,
) -> Arc<parking_lot::Mutex<String>> {
    let log = Arc::new(parking_lot::Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
            let mut s = sink.lock();
            s.push_str(&line);
            s.push('\n');
        }
    });
    log
}

/// A running `modbus_sim.py`; killed on drop.
pub(crate) struct ModbusSim {
    _child: Child,
    /// The TCP address it serves (TCP sims only).
    pub(crate) addr: Option<SocketAddr>,
}

impl ModbusSim {
    /// Serves unit 1 over Modbus TCP on a free local port with `registers`
    /// (`{"holding": {"0": 1}, "input": .., "coils": .., "discrete": ..}`).
    pub(crate) async fn tcp(registers: Value) -> ModbusSim {
        // The port is picked by binding :0 and released for the sim; another process could
        // take it in between, so a start that failed to listen is retried on a new port.
        let mut last_error = String::new();
        for _ in 0..5 {
            let addr = free_port();
            match Self::spawn(&["--tcp".into(), addr.to_string()], &registers).await {
                Ok(child) => return ModbusSim { _child: child, addr: Some(addr) },
                Err(e) => last_error = e,
            }
        }
        panic!("the Modbus server peer did not start: {last_error}");
    }

    /// Serves `unit` over Modbus RTU on the serial device `path`.
    pub(crate) async fn rtu(path: &str, unit: u8, registers: Value) -> ModbusSim {
        let args = ["--rtu".into(), path.into(), "--unit".into(), unit.to_string()];
        match Self::spawn(&args, &registers).await {
            Ok(child) => ModbusSim { _child: child, addr: None },
            Err(e) => panic!("the Modbus RTU server peer did not start on {path}: {e}"),
        }
    }

    /// The TCP address, for the adapter's `host`.
    pub(crate) fn host(&self) -> String {
        self.addr.expect("a TCP sim").to_string()
    }

    async fn spawn(args: &[String], registers: &Value) -> Result<Child, String> {
        let python = peers_python();
        let mut child = Command::new(&python)
            .arg(sim_script())
            .args(args)
            .arg("--registers")
            .arg(registers.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
        let stderr = collect_stderr("modbus_sim", child.stderr.take().expect("piped stderr"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let ready = tokio::time::timeout(PATIENCE, async {
            loop {
                match stdout.next_line().await {
                    Ok(Some(line)) if line.trim() == "READY" => return true,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return false,
                }
            }
        })
        .await;
        match ready {
            Ok(true) => {
                // Keep stdout open (the sim must not get EPIPE) by draining it in the background.
                tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
                Ok(child)
            }
            Ok(false) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                // Give the stderr reader a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let err = stderr.lock().clone();
                if err.contains("No module named") {
                    panic!("the peers' venv lacks a module the Modbus sim needs ({}): {INSTALL_HINT}", err.trim());
                }
                Err(format!("modbus_sim {args:?} exited ({status}) before READY:\n{err}"))
            }
            Err(_) => Err(format!("modbus_sim {args:?} printed no READY within {PATIENCE:?}:\n{}", stderr.lock())),
        }
    }
}

/// A local address nothing listens on at the moment of the call.
pub(crate) fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// A TCP listener that accepts every connection and never answers (a hung device).
/// Stopped (and its connections closed) on drop.
pub(crate) struct SilentDevice {
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SilentDevice {
    pub(crate) async fn start() -> SilentDevice {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind silent listener");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        SilentDevice { addr, task }
    }
}

impl Drop for SilentDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Register writes a device received: `(first register, values)`.
pub(crate) type Writes = Arc<parking_lot::Mutex<Vec<(u16, Vec<u16>)>>>;

/// A minimal Modbus TCP device (unit 1) that answers every read with zeros after `read_delay`
/// (adjustable while it runs) and acknowledges holding-register writes at once, remembering
/// them: a PLC whose polls are slow. Stopped (with its connections) on drop.
pub(crate) struct SlowDevice {
    pub(crate) addr: SocketAddr,
    /// Read delay in ms.
    pub(crate) read_delay_ms: Arc<AtomicU64>,
    /// Read requests received.
    pub(crate) reads: Arc<AtomicU64>,
    /// `(first register, values)` of every register write received.
    pub(crate) writes: Writes,
    task: tokio::task::JoinHandle<()>,
}

impl SlowDevice {
    pub(crate) async fn start(read_delay: Duration) -> SlowDevice {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind slow device");
        let addr = listener.local_addr().expect("local addr");
        let read_delay_ms = Arc::new(AtomicU64::new(u64::try_from(read_delay.as_millis()).unwrap_or(u64::MAX)));
        let reads = Arc::new(AtomicU64::new(0));
        let writes = Writes::default();
        let (delay, r, w) = (read_delay_ms.clone(), reads.clone(), writes.clone());
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                conns.spawn(serve_slow(sock, delay.clone(), r.clone(), w.clone()));
            }
        });
        SlowDevice { addr, read_delay_ms, reads, writes, task }
    }
}

impl Drop for SlowDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_slow(mut sock: tokio::net::TcpStream, delay: Arc<AtomicU64>, reads: Arc<AtomicU64>, writes: Writes) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        // MBAP header: transaction id, protocol id, length (unit id + PDU), unit id.
        let mut mbap = [0u8; 7];
        if sock.read_exact(&mut mbap).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([mbap[4], mbap[5]]));
        let mut pdu = vec![0u8; len.saturating_sub(1)];
        if pdu.len() < 5 || sock.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let function = pdu[0];
        let start = u16::from_be_bytes([pdu[1], pdu[2]]);
        let count = u16::from_be_bytes([pdu[3], pdu[4]]);
        let answer: Vec<u8> = match function {
            3 | 4 => {
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay.load(Ordering::SeqCst))).await;
                let mut a = vec![function, u8::try_from(count * 2).unwrap_or(0)];
                a.resize(2 + usize::from(count) * 2, 0);
                a
            }
            16 => {
                let values = pdu.get(6..).unwrap_or_default().chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                writes.lock().push((start, values.collect()));
                pdu[..5].to_vec()
            }
            // Illegal function.
            f => vec![f | 0x80, 1],
        };
        let mut frame = mbap[..4].to_vec();
        frame.extend(u16::try_from(answer.len() + 1).unwrap_or(0).to_be_bytes());
        frame.push(mbap[6]);
        frame.extend(answer);
        if sock.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// A socat pseudo-terminal pair (a null-modem cable); killed on drop.
pub(crate) struct PtyPair {
    _child: Child,
    /// One end (for the sim).
    pub(crate) a: String,
    /// The other end (for the adapter).
    pub(crate) b: String,
}

impl PtyPair {
    pub(crate) async fn start() -> PtyPair {
        let mut child = Command::new("socat")
            .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run socat ({e}): {INSTALL_HINT} (it installs socat)"));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let mut ptys = Vec::new();
        let mut seen = String::new();
        let found = tokio::time::timeout(PATIENCE, async {
            while ptys.len() < 2 {
                let Ok(Some(line)) = lines.next_line().await else { return false };
                seen.push_str(&line);
                seen.push('\n');
                if let Some((_, path)) = line.split_once("PTY is ") {
                    ptys.push(path.trim().to_string());
                }
            }
            true
        })
        .await;
        assert!(matches!(found, Ok(true)), "socat did not report two PTYs:\n{seen}");
        // socat keeps logging (e.g. when an end closes); keep its stderr drained.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let b = ptys.pop().expect("second pty");
        let a = ptys.pop().expect("first pty");
        PtyPair { _child: child, a, b }
    }
}

// ----------------------------------------------------------------------------------------
// A direct Modbus client (what an engineer's tool would show).

/// Connects a Modbus TCP client to unit 1 of `addr` (`tcp::connect` alone would address unit
/// 255, which the sim answers with exception 04).
pub(crate) async fn client(addr: SocketAddr) -> Context {
    tokio_modbus::client::tcp::connect_slave(addr, Slave(1))
        .await
        .unwrap_or_else(|e| panic!("connect a Modbus client to {addr}: {e}"))
}

/// Reads holding registers.
pub(crate) async fn read_holding(addr: SocketAddr, register: u16, count: u16) -> Vec<u16> {
    let mut c = client(addr).await;
    let words = c
        .read_holding_registers(register, count)
        .await
        .expect("read holding (transport)")
        .expect("read holding (exception)");
    let _ = c.disconnect().await;
    words
}

/// Reads one coil.
pub(crate) async fn read_coil(addr: SocketAddr, register: u16) -> bool {
    let mut c = client(addr).await;
    let bits = c.read_coils(register, 1).await.expect("read coil (transport)").expect("read coil (exception)");
    let _ = c.disconnect().await;
    bits[0]
}

/// Writes one holding register.
pub(crate) async fn write_holding(addr: SocketAddr, register: u16, value: u16) {
    let mut c = client(addr).await;
    c.write_single_register(register, value)
        .await
        .expect("write holding (transport)")
        .expect("write holding (exception)");
    let _ = c.disconnect().await;
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

    /// The latest body of `address`/`key` as JSON.
    pub(crate) fn body(&self, address: &str, key: &str) -> Option<Value> {
        self.latest(address, key).map(|c| body_json(&c))
    }
}

/// The `{"value": .., "unit": ..}` body of a reading (unit only when configured).
pub(crate) fn reading(value: Value, unit: Option<&str>) -> Value {
    let mut body = serde_json::json!({ "value": value });
    if let Some(u) = unit {
        body["unit"] = u.into();
    }
    body
}
