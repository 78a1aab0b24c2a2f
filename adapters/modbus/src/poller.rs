//! One task per field device: polls its schedules, applies deadbands, writes readings through
//! ingest, backs off exponentially while the device fails, and serves set-point writes.
//! A device's failures only ever delay that device (and, on a shared serial line, the line).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kalima_core::tx::TxContent;
use kalima_core::{Error as CoreError, Ingest};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{DeviceConfig, Transport};
use crate::decode::{self, Encoded, Value};
use crate::link::{Link, LinkError, Op, Reply};
use crate::plan::{Schedule, plan};

/// Interface label of Modbus writes in metrics.
pub const INTERFACE: &str = "modbus";

/// Health of a device as the status API shows it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not polled successfully yet.
    Connecting,
    /// The last poll succeeded.
    Ok,
    /// The last attempt failed; waiting out a backoff.
    Failing,
    /// The device answers but the chain refuses its readings (Kalima device or grant missing).
    Unauthorized,
}

impl DeviceState {
    fn label(self) -> &'static str {
        match self {
            DeviceState::Connecting => "connecting",
            DeviceState::Ok => "ok",
            DeviceState::Failing => "failing",
            DeviceState::Unauthorized => "unauthorized",
        }
    }
}

/// Status of one field device.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceStatus {
    /// Configured name.
    pub name: String,
    /// `tcp` or `rtu`.
    pub transport: String,
    /// Host or serial port.
    pub endpoint: String,
    /// Modbus unit id.
    pub unit_id: u8,
    /// Kalima device the readings are written as.
    pub kalima_device: String,
    /// Health.
    pub state: DeviceState,
    /// Points in the register map.
    pub points: usize,
    /// Read requests one full poll makes.
    pub requests_per_poll: usize,
    /// Successful polls.
    pub polls_ok: u64,
    /// Failed polls (including connection failures).
    pub polls_failed: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Readings committed to the chain.
    pub readings_written: u64,
    /// Readings skipped because they stayed within the deadband.
    pub readings_unchanged: u64,
    /// Readings that could not be decoded (and were not written).
    pub readings_invalid: u64,
    /// Unix ms of the last successful poll.
    pub last_success_ms: Option<i64>,
    /// Latest error, with its unix ms.
    pub last_error: Option<String>,
    /// When the latest error happened (unix ms).
    pub last_error_ms: Option<i64>,
    /// While failing: unix ms of the next attempt.
    pub next_attempt_ms: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A set-point request sent to a device task.
pub(crate) struct WriteCommand {
    pub(crate) register: u16,
    pub(crate) value: Encoded,
    /// Latest time the write may start; past it the requester has been told it failed.
    pub(crate) start_by: tokio::time::Instant,
    pub(crate) reply: oneshot::Sender<Result<(), LinkError>>,
}

/// The shared side of a device task.
#[derive(Debug)]
pub(crate) struct DeviceHandle {
    pub(crate) config: DeviceConfig,
    pub(crate) kalima_device: String,
    pub(crate) status: Mutex<DeviceStatus>,
    pub(crate) commands: mpsc::Sender<WriteCommand>,
}

impl DeviceHandle {
    fn set_state(&self, st: &mut DeviceStatus, state: DeviceState) {
        if st.state != state {
            metrics::gauge!("kalima_adapter_devices", "adapter" => INTERFACE, "state" => st.state.label())
                .decrement(1.0);
            metrics::gauge!("kalima_adapter_devices", "adapter" => INTERFACE, "state" => state.label()).increment(1.0);
            st.state = state;
        }
    }
}

struct LastWrite {
    value: Value,
    at: Instant,
}

/// Starts the task of one device.
pub(crate) fn spawn(
    config: DeviceConfig,
    kalima_device: String,
    link: Link,
    ingest: Ingest,
) -> (Arc<DeviceHandle>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let schedules = plan(&config);
    let status = DeviceStatus {
        name: config.name.clone(),
        transport: match config.transport {
            Transport::Tcp => "tcp".into(),
            Transport::Rtu => "rtu".into(),
        },
        endpoint: link.endpoint().to_string(),
        unit_id: config.unit_id,
        kalima_device: kalima_device.clone(),
        state: DeviceState::Connecting,
        points: config.points.len(),
        requests_per_poll: schedules.iter().map(|s| s.requests.len()).sum(),
        polls_ok: 0,
        polls_failed: 0,
        consecutive_failures: 0,
        readings_written: 0,
        readings_unchanged: 0,
        readings_invalid: 0,
        last_success_ms: None,
        last_error: None,
        last_error_ms: None,
        next_attempt_ms: None,
    };
    metrics::gauge!("kalima_adapter_devices", "adapter" => INTERFACE, "state" => "connecting").increment(1.0);
    let handle = Arc::new(DeviceHandle { config, kalima_device, status: Mutex::new(status), commands: tx });
    let task = Poller { handle: handle.clone(), link, ingest, schedules, last: BTreeMap::new() };
    let jh = tokio::spawn(task.run(rx));
    (handle, jh)
}

struct Poller {
    handle: Arc<DeviceHandle>,
    link: Link,
    ingest: Ingest,
    schedules: Vec<Schedule>,
    last: BTreeMap<usize, LastWrite>,
}

impl Poller {
    async fn run(mut self, mut commands: mpsc::Receiver<WriteCommand>) {
        let cfg = &self.handle.config;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let base_backoff = Duration::from_millis(cfg.poll_interval_ms.max(100));
        let max_backoff = Duration::from_millis(cfg.backoff_max_ms);
        let mut due: Vec<tokio::time::Instant> = vec![tokio::time::Instant::now(); self.schedules.len()];
        let mut backoff = base_backoff;
        let mut resume_at: Option<tokio::time::Instant> = None;
        loop {
            let next = match resume_at {
                Some(t) => t,
                None => due.iter().min().copied().unwrap_or_else(|| tokio::time::Instant::now() + base_backoff),
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    // A set-point the requester stopped waiting for is already recorded as
                    // failed: it must never reach the device afterwards.
                    if cmd.reply.is_closed() || tokio::time::Instant::now() >= cmd.start_by {
                        let _ = cmd.reply.send(Err(LinkError::Busy));
                        continue;
                    }
                    let res = self.write(cmd.register, &cmd.value, timeout).await;
                    let written = res.is_ok();
                    let _ = cmd.reply.send(res);
                    if written {
                        // Read the new value back at once so the chain shows what the device
                        // holds; the device answered, so any backoff is over.
                        resume_at = None;
                        backoff = base_backoff;
                        due.iter_mut().for_each(|d| *d = tokio::time::Instant::now());
                    }
                    continue;
                }
            }
            resume_at = None;
            let now = tokio::time::Instant::now();
            let mut failed = None;
            for (i, next_due) in due.iter_mut().enumerate() {
                if *next_due > now {
                    continue;
                }
                // Intervals are kept from the planned time, not from when the poll ended.
                let interval = self.schedules[i].interval;
                while *next_due <= now {
                    *next_due += interval;
                }
                if let Err(e) = self.poll(i, timeout).await {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => backoff = base_backoff,
                Some(e) => {
                    let wait = backoff;
                    backoff = (backoff * 2).min(max_backoff);
                    let at = tokio::time::Instant::now() + wait;
                    resume_at = Some(at);
                    // Everything missed while failing is polled once when the device is back.
                    due.iter_mut().for_each(|d| *d = at);
                    let mut st = self.handle.status.lock();
                    st.polls_failed += 1;
                    st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                    st.last_error = Some(e.to_string());
                    st.last_error_ms = Some(now_ms());
                    st.next_attempt_ms = Some(now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
                    self.handle.set_state(&mut st, DeviceState::Failing);
                    tracing::debug!(target: "adapter::modbus", device = %st.name, error = %e, wait_ms = wait.as_millis() as u64, "Poll failed.");
                }
            }
        }
    }

    async fn write(&self, register: u16, value: &Encoded, timeout: Duration) -> Result<(), LinkError> {
        let op = match value {
            Encoded::Bit(b) => Op::WriteCoil(register, *b),
            Encoded::Words(w) => Op::WriteRegisters(register, w),
        };
        self.link.call(self.handle.config.unit_id, timeout, op).await.map(|_| ())
    }

    /// Reads every request of schedule `i`, then commits the readings that pass their deadband.
    async fn poll(&mut self, i: usize, timeout: Duration) -> Result<(), LinkError> {
        let started = Instant::now();
        let cfg = self.handle.config.clone();
        let mut values: Vec<(usize, Result<Value, decode::DecodeError>)> = Vec::new();
        for req in &self.schedules[i].requests {
            let res = self.link.call(cfg.unit_id, timeout, Op::Read(req.function, req.start, req.count)).await;
            metrics::counter!("kalima_adapter_polls_total", "adapter" => INTERFACE, "outcome" => res.as_ref().map_or_else(LinkError::reason, |_| "ok")).increment(1);
            let reply = res?;
            for &p in &req.points {
                let point = &cfg.points[p];
                let off = usize::from(point.register.saturating_sub(req.start));
                let v = match &reply {
                    Reply::Bits(bits) => bits
                        .get(off)
                        .map(|b| decode::decode_bit(*b))
                        .ok_or(decode::DecodeError::Short { expected: off + 1, got: bits.len() }),
                    Reply::Words(words) => decode::decode(point, words.get(off..).unwrap_or_default()),
                    Reply::Written => Err(decode::DecodeError::Short { expected: usize::from(point.len()), got: 0 }),
                };
                values.push((p, v));
            }
        }
        metrics::histogram!("kalima_adapter_poll_seconds", "adapter" => INTERFACE)
            .record(started.elapsed().as_secs_f64());
        let time = now_ms();
        let mut items = Vec::new();
        let mut written = Vec::new();
        let (mut unchanged, mut invalid) = (0u64, 0u64);
        for (p, v) in values {
            let point = &cfg.points[p];
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    invalid += 1;
                    metrics::counter!("kalima_adapter_readings_total", "adapter" => INTERFACE, "outcome" => "invalid")
                        .increment(1);
                    tracing::debug!(target: "adapter::modbus", device = %cfg.name, key = %point.key, error = %e, "Reading not decodable.");
                    let mut st = self.handle.status.lock();
                    st.last_error = Some(format!("point {:?}: {e}", point.key));
                    st.last_error_ms = Some(time);
                    continue;
                }
            };
            if !self.should_write(p, &v) {
                unchanged += 1;
                continue;
            }
            let mut body = serde_json::Map::new();
            body.insert("value".into(), v.to_json());
            if !point.unit.is_empty() {
                body.insert("unit".into(), point.unit.clone().into());
            }
            items.push(TxContent {
                address: cfg.point_address(point).to_string(),
                key: point.key.clone(),
                body: serde_json::to_vec(&body).unwrap_or_default(),
                props: [
                    ("source".to_string(), "modbus".to_string()),
                    ("modbus_device".to_string(), cfg.name.clone()),
                    ("modbus_register".to_string(), format!("{}:{}", point.function.as_str(), point.register)),
                ]
                .into(),
                client_time_ms: Some(time),
                ..TxContent::default()
            });
            written.push((p, v));
        }
        metrics::counter!("kalima_adapter_readings_total", "adapter" => INTERFACE, "outcome" => "unchanged")
            .increment(unchanged);
        let commit = if items.is_empty() { Ok(()) } else { self.commit(items).await };
        let mut st = self.handle.status.lock();
        st.readings_unchanged += unchanged;
        st.readings_invalid += invalid;
        st.polls_ok += 1;
        st.consecutive_failures = 0;
        st.next_attempt_ms = None;
        st.last_success_ms = Some(time);
        match commit {
            Ok(()) => {
                let n = written.len() as u64;
                st.readings_written += n;
                metrics::counter!("kalima_adapter_readings_total", "adapter" => INTERFACE, "outcome" => "written")
                    .increment(n);
                let at = Instant::now();
                for (p, value) in written {
                    self.last.insert(p, LastWrite { value, at });
                }
                self.handle.set_state(&mut st, DeviceState::Ok);
            }
            Err((state, msg)) => {
                metrics::counter!("kalima_adapter_readings_total", "adapter" => INTERFACE, "outcome" => "rejected")
                    .increment(written.len() as u64);
                st.last_error = Some(msg);
                st.last_error_ms = Some(time);
                self.handle.set_state(&mut st, state);
            }
        }
        Ok(())
    }

    fn should_write(&self, p: usize, v: &Value) -> bool {
        let point = &self.handle.config.points[p];
        let Some(deadband) = point.deadband else { return true };
        let Some(last) = self.last.get(&p) else { return true };
        if point.refresh_secs > 0 && last.at.elapsed() >= Duration::from_secs(point.refresh_secs) {
            return true;
        }
        match (v.as_f64(), last.value.as_f64()) {
            (Some(a), Some(b)) if deadband > 0.0 => (a - b).abs() > deadband,
            _ => *v != last.value,
        }
    }

    async fn commit(&self, items: Vec<TxContent>) -> Result<(), (DeviceState, String)> {
        let id = &self.handle.kalima_device;
        let device = self.ingest.device(INTERFACE, id).map_err(|r| {
            (
                DeviceState::Unauthorized,
                format!("readings refused: {r} (register Kalima device {id:?} and grant it write access)"),
            )
        })?;
        match self.ingest.write(INTERFACE, &device, items).await {
            Ok(_) => Ok(()),
            Err(CoreError::Rejected(r)) => Err((DeviceState::Unauthorized, format!("readings refused: {r}"))),
            Err(e) => Err((DeviceState::Failing, format!("commit failed: {e}"))),
        }
    }
}
