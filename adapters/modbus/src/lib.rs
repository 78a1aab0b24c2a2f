//! Modbus TCP and RTU adapter: polls register maps from the `[modbus]` config section and
//! writes the readings through the node's ingest, with per-device timeouts, exponential
//! backoff, deadbands, a status view and set-point writes recorded on the chain.

pub mod config;
pub mod decode;
pub mod link;
pub mod plan;
mod poller;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kalima_core::registry::Device;
use kalima_core::tx::TxContent;
use kalima_core::{Error as CoreError, Ingest};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use config::ModbusSection;
pub use poller::{DeviceState, DeviceStatus, INTERFACE};

use crate::config::Transport;
use crate::link::{Link, LinkError};
use crate::poller::{DeviceHandle, WriteCommand};

/// The running adapter: one task per field device.
#[derive(Debug)]
pub struct ModbusAdapter {
    devices: Vec<Arc<DeviceHandle>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ingest: Ingest,
}

/// Why a set-point was not written.
#[derive(Debug, thiserror::Error)]
pub enum SetpointError {
    /// No such Modbus device or point.
    #[error("{0}")]
    NotFound(String),
    /// The point is not configured `writable`.
    #[error("point {0:?} is not writable (set writable = true on a coil or holding_register)")]
    NotWritable(String),
    /// The requester lacks a write grant on the point's address.
    #[error("device {device:?} has no write grant on {address:?}")]
    Forbidden {
        /// Requesting device.
        device: String,
        /// The point's address.
        address: String,
    },
    /// The value does not fit the point.
    #[error("invalid value: {0}")]
    Invalid(#[from] decode::EncodeError),
    /// The chain refused or failed to record the outcome.
    #[error("could not record the set-point: {0}")]
    Record(#[from] CoreError),
}

/// What happened to a set-point.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SetpointOutcome {
    /// `written` when the device acknowledged it, `failed` otherwise.
    pub outcome: String,
    /// Why the device did not take it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Address of the record on the chain.
    pub address: String,
    /// Key of the record (`<point key>.setpoint`).
    pub key: String,
    /// Id (hex) of the transaction recording the request and its outcome.
    pub tx_id: String,
}

impl ModbusAdapter {
    /// Starts polling every configured device (the section must have been validated).
    pub fn start(section: &ModbusSection, ingest: Ingest) -> ModbusAdapter {
        let mut serial_lines: HashMap<String, Link> = HashMap::new();
        let mut devices = Vec::new();
        let mut tasks = Vec::new();
        for d in &section.devices {
            let link = match d.transport {
                Transport::Tcp => Link::new(d),
                // Devices on one serial line take turns on one port.
                Transport::Rtu => serial_lines.entry(d.serial_port.clone()).or_insert_with(|| Link::new(d)).clone(),
            };
            let who = d.kalima_device.clone().unwrap_or_else(|| section.kalima_device.clone());
            let (h, t) = poller::spawn(d.clone(), who, link, ingest.clone());
            devices.push(h);
            tasks.push(t);
        }
        if !devices.is_empty() {
            tracing::info!(target: "adapter::modbus", devices = devices.len(), "Modbus adapter polling.");
        }
        ModbusAdapter { devices, tasks, ingest }
    }

    /// Status of every device, in config order.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices.iter().map(|d| d.status.lock().clone()).collect()
    }

    /// Addresses each device writes to, in config order (for read-grant filtering).
    pub fn addresses(&self, name: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| d.config.name == name)
            .flat_map(|d| d.config.points.iter().map(|p| d.config.point_address(p).to_string()))
            .collect()
    }

    /// Writes `value` (engineering units) to point `key` of device `name` for `requester`,
    /// and records the request and its outcome on the chain as `requester`.
    pub async fn write_setpoint(
        &self,
        requester: &Device,
        name: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<SetpointOutcome, SetpointError> {
        let dev = self
            .devices
            .iter()
            .find(|d| d.config.name == name)
            .ok_or_else(|| SetpointError::NotFound(format!("no Modbus device named {name:?}")))?;
        let point = dev
            .config
            .points
            .iter()
            .find(|p| p.key == key)
            .ok_or_else(|| SetpointError::NotFound(format!("Modbus device {name:?} has no point {key:?}")))?;
        let address = dev.config.point_address(point).to_string();
        if !requester.can_write(&address) {
            return Err(SetpointError::Forbidden { device: requester.id.clone(), address });
        }
        if !point.writable {
            return Err(SetpointError::NotWritable(key.to_string()));
        }
        let encoded = decode::encode(point, value)?;
        let (reply, rx) = oneshot::channel();
        // The write must start within one poll's worth of waiting; once started it can take a
        // connect and a request timeout. Waiting past both means every write that reaches the
        // device is reported, and one that could not start is never sent later.
        let timeout = Duration::from_millis(dev.config.timeout_ms);
        let start_by = tokio::time::Instant::now() + 2 * timeout + Duration::from_secs(1);
        let cmd = WriteCommand { register: point.register, value: encoded, start_by, reply };
        // The device task owns the connection; a queue full of set-points is an error, not a wait.
        let res: Result<(), LinkError> = match dev.commands.try_send(cmd) {
            Ok(()) => match tokio::time::timeout_at(start_by + 2 * timeout + Duration::from_secs(1), rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(LinkError::Stopped),
                Err(_) => Err(LinkError::Timeout(dev.config.timeout_ms)),
            },
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(LinkError::Io("too many set-points queued for this device".into()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LinkError::Stopped),
        };
        let outcome = if res.is_ok() { "written" } else { "failed" };
        metrics::counter!("kalima_adapter_setpoints_total", "adapter" => INTERFACE, "outcome" => outcome).increment(1);
        let error = res.err().map(|e| e.to_string());
        let mut body = serde_json::json!({ "value": value, "outcome": outcome, "device": name });
        if let Some(e) = &error {
            body["error"] = e.clone().into();
        }
        let record = TxContent {
            address: address.clone(),
            key: format!("{key}.setpoint"),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            props: [
                ("source".to_string(), "modbus".to_string()),
                ("modbus_device".to_string(), name.to_string()),
                ("modbus_register".to_string(), format!("{}:{}", point.function.as_str(), point.register)),
            ]
            .into(),
            ..TxContent::default()
        };
        let written = self.ingest.write(INTERFACE, requester, vec![record]).await?;
        let tx_id = written.receipts().first().map(|r| hex::encode(r.id)).unwrap_or_default();
        Ok(SetpointOutcome { outcome: outcome.into(), error, address, key: format!("{key}.setpoint"), tx_id })
    }

    /// Stops every device task.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for ModbusAdapter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
