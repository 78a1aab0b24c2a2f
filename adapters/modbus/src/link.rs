//! Connections to field devices. A TCP device has its own connection; devices on one serial
//! line share it (one request at a time on the wire, each with its own unit id).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;

use crate::config::{DeviceConfig, Parity, Transport};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The connection could not be opened.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// Host or serial port.
        endpoint: String,
        /// The I/O error.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The connection failed mid-request.
    #[error("transport error: {0}")]
    Io(String),
    /// The device answered with a Modbus exception.
    #[error("device answered with exception {0}")]
    Exception(String),
    /// A set-point could not start in time (the line was busy); it was not sent.
    #[error("the device was busy and the write did not start in time; nothing was sent")]
    Busy,
    /// The device's task is not running.
    #[error("the device's poller is stopped")]
    Stopped,
}

impl LinkError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LinkError::Connect { .. } => "connect",
            LinkError::Timeout(_) => "timeout",
            LinkError::Io(_) => "io",
            LinkError::Exception(_) => "exception",
            LinkError::Busy => "busy",
            LinkError::Stopped => "stopped",
        }
    }

    /// Whether the connection must be reopened before the next request.
    fn breaks_link(&self) -> bool {
        // After a timeout a late answer could be taken for the next request's: start clean.
        !matches!(self, LinkError::Exception(_) | LinkError::Busy | LinkError::Stopped)
    }
}

/// A connection (opened lazily, reopened after failures) shared by the devices behind it.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Mutex<Option<Context>>>,
    endpoint: String,
    open: Arc<dyn Fn() -> futures::future::BoxFuture<'static, std::io::Result<Context>> + Send + Sync>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("endpoint", &self.endpoint).finish()
    }
}

/// One request on a link.
pub enum Op<'a> {
    /// Read `count` bits or registers from `start`.
    Read(crate::config::Function, u16, u16),
    /// Write one coil.
    WriteCoil(u16, bool),
    /// Write holding registers from `start`.
    WriteRegisters(u16, &'a [u16]),
}

/// What a read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Bits of a coil or discrete-input read.
    Bits(Vec<bool>),
    /// Registers of a register read.
    Words(Vec<u16>),
    /// A write was acknowledged.
    Written,
}

impl Link {
    /// The link for `device` (not yet connected).
    pub fn new(device: &DeviceConfig) -> Link {
        match device.transport {
            Transport::Tcp => {
                let host = device.host.clone();
                Link {
                    inner: Arc::new(Mutex::new(None)),
                    endpoint: host.clone(),
                    open: Arc::new(move || {
                        let host = host.clone();
                        Box::pin(async move {
                            let addr = tokio::net::lookup_host(&host).await?.next().ok_or_else(|| {
                                std::io::Error::new(std::io::ErrorKind::NotFound, "host name has no address")
                            })?;
                            let stream = tokio::net::TcpStream::connect(addr).await?;
                            stream.set_nodelay(true)?;
                            Ok(tokio_modbus::client::tcp::attach(stream))
                        })
                    }),
                }
            }
            Transport::Rtu => {
                let builder = tokio_serial::new(device.serial_port.clone(), device.baud_rate)
                    .parity(match device.parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .data_bits(if device.data_bits == 7 {
                        tokio_serial::DataBits::Seven
                    } else {
                        tokio_serial::DataBits::Eight
                    })
                    .stop_bits(if device.stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    });
                Link {
                    inner: Arc::new(Mutex::new(None)),
                    endpoint: device.serial_port.clone(),
                    open: Arc::new(move || {
                        let builder = builder.clone();
                        Box::pin(async move {
                            let port = tokio_serial::SerialStream::open(&builder).map_err(std::io::Error::from)?;
                            Ok(tokio_modbus::client::rtu::attach(port))
                        })
                    }),
                }
            }
        }
    }

    /// Host or serial port.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs `op` for `unit`, connecting first if needed; a transport failure or timeout
    /// closes the connection so the next call starts on a fresh one.
    pub async fn call(&self, unit: u8, timeout: Duration, op: Op<'_>) -> Result<Reply, LinkError> {
        let mut guard = self.inner.lock().await;
        if guard.is_none() {
            let ctx = tokio::time::timeout(timeout, (self.open)())
                .await
                .map_err(|_| LinkError::Connect { endpoint: self.endpoint.clone(), reason: "timed out".into() })?
                .map_err(|e| LinkError::Connect { endpoint: self.endpoint.clone(), reason: e.to_string() })?;
            *guard = Some(ctx);
        }
        let Some(ctx) = guard.as_mut() else {
            return Err(LinkError::Io("connection unavailable".into()));
        };
        ctx.set_slave(Slave(unit));
        let res = tokio::time::timeout(timeout, run(ctx, op)).await;
        let out = match res {
            Err(_) => Err(LinkError::Timeout(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))),
            Ok(Err(e)) => Err(LinkError::Io(e.to_string())),
            Ok(Ok(Err(code))) => Err(LinkError::Exception(format!("{code:?}"))),
            Ok(Ok(Ok(reply))) => Ok(reply),
        };
        if out.as_ref().is_err_and(LinkError::breaks_link) {
            *guard = None;
        }
        out
    }

    /// Closes the connection; the next call reopens it.
    pub async fn reset(&self) {
        *self.inner.lock().await = None;
    }
}

async fn run(ctx: &mut Context, op: Op<'_>) -> tokio_modbus::Result<Reply> {
    use crate::config::Function::*;
    Ok(match op {
        Op::Read(Coil, start, n) => ctx.read_coils(start, n).await?.map(Reply::Bits),
        Op::Read(DiscreteInput, start, n) => ctx.read_discrete_inputs(start, n).await?.map(Reply::Bits),
        Op::Read(HoldingRegister, start, n) => ctx.read_holding_registers(start, n).await?.map(Reply::Words),
        Op::Read(InputRegister, start, n) => ctx.read_input_registers(start, n).await?.map(Reply::Words),
        Op::WriteCoil(addr, v) => ctx.write_single_coil(addr, v).await?.map(|()| Reply::Written),
        Op::WriteRegisters(addr, words) => ctx.write_multiple_registers(addr, words).await?.map(|()| Reply::Written),
    })
}
