//! `kalima bench modbus`: a node polls simulated Modbus TCP devices (served by a child
//! process, so their CPU is not counted) and the bench reports points polled per second,
//! readings committed per second and the node process's CPU use.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tokio::io::AsyncBufReadExt;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

use crate::config::Config;
use crate::node;

/// Options of `kalima bench modbus`.
#[derive(Debug, Args)]
pub struct ModbusArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// u16 points per device (one holding register each; read in requests of up to 125).
    #[arg(long, default_value_t = 125)]
    points: u16,
    /// Poll interval of every device, ms.
    #[arg(long, default_value_t = 12)]
    poll_interval_ms: u64,
    /// Milliseconds between value changes on the devices (0: values never change, so the
    /// deadband keeps commits to the first reading).
    #[arg(long, default_value_t = 0)]
    change_every_ms: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
}

/// Options of the hidden simulator process.
#[derive(Debug, Args)]
pub struct SimArgs {
    #[arg(long)]
    devices: usize,
    #[arg(long)]
    change_every_ms: u64,
}

#[derive(Clone)]
struct Sim {
    started: Instant,
    change_every_ms: u64,
}

impl tokio_modbus::server::Service for Sim {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let step = if self.change_every_ms == 0 {
            0
        } else {
            (self.started.elapsed().as_millis() / u128::from(self.change_every_ms)) as u16
        };
        std::future::ready(match req {
            Request::ReadHoldingRegisters(start, n) => {
                Ok(Response::ReadHoldingRegisters((0..n).map(|i| start.wrapping_add(i).wrapping_add(step)).collect()))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// Serves `devices` simulated devices on loopback ports and prints the ports on one line.
pub async fn serve(a: SimArgs) -> anyhow::Result<()> {
    let sim = Sim { started: Instant::now(), change_every_ms: a.change_every_ms };
    let mut ports = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..a.devices {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        ports.push(listener.local_addr()?.port().to_string());
        let sim = sim.clone();
        tasks.push(tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, addr| {
                let sim = sim.clone();
                async move { accept_tcp_connection(stream, addr, move |_| Ok(Some(sim.clone()))) }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        }));
    }
    println!("{}", ports.join(" "));
    futures::future::join_all(tasks).await;
    Ok(())
}

/// CPU seconds (user + system) used by this process so far.
fn process_cpu_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on Linux for the /proc interface.
    Ok(ticks as f64 / 100.0)
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: ModbusArgs) -> anyhow::Result<()> {
    if a.points == 0 || a.devices == 0 {
        bail!("--devices and --points must be positive");
    }
    let exe = std::env::current_exe()?;
    let mut sim = tokio::process::Command::new(exe)
        .args([
            "bench",
            "modbus-sim",
            "--devices",
            &a.devices.to_string(),
            "--change-every-ms",
            &a.change_every_ms.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the simulated devices")?;
    let mut lines = tokio::io::BufReader::new(sim.stdout.take().context("simulator stdout")?).lines();
    let ports_line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??.context("no ports")?;
    let ports: Vec<&str> = ports_line.split_whitespace().collect();

    let dir = tempfile::tempdir()?;
    node::init(dir.path(), "bench")?;
    let mut cfg = Config::load(dir.path())?;
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.mqtt.listen = String::new();
    cfg.chain.checkpoint_interval_secs = 0;
    // The node's own device writes the readings, so no registration step skews the start.
    cfg.modbus.kalima_device = "admin".into();
    for (i, port) in ports.iter().enumerate() {
        let points = (0..a.points)
            .map(|r| kalima_adapter_modbus::config::PointConfig {
                key: format!("r{r}"),
                register: r,
                deadband: Some(0.0),
                ..Default::default()
            })
            .collect();
        cfg.modbus.devices.push(kalima_adapter_modbus::config::DeviceConfig {
            name: format!("sim-{i}"),
            host: format!("127.0.0.1:{port}"),
            address: format!("/bench/modbus/dev-{i}"),
            poll_interval_ms: a.poll_interval_ms,
            backoff_max_ms: 1000.max(a.poll_interval_ms),
            points,
            ..Default::default()
        });
    }
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    let running = node::start(dir.path(), cfg).await?;
    let adapter = running.modbus().context("adapter not started")?.clone();
    let totals = || {
        let s = adapter.status();
        let polled: u64 = s.iter().map(|d| d.polls_ok * d.points as u64).sum();
        let written: u64 = s.iter().map(|d| d.readings_written).sum();
        let failed: u64 = s.iter().map(|d| d.polls_failed).sum();
        (polled, written, failed)
    };
    // Warm-up: every device has committed its first readings.
    let warm = Instant::now();
    while adapter.status().iter().any(|d| d.readings_written == 0) {
        if warm.elapsed() > Duration::from_secs(30) {
            bail!("devices not polled within 30 s: {:?}", adapter.status());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p0, w0, f0) = totals();
    let c0 = process_cpu_secs()?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.duration_secs)).await;
    let (p1, w1, f1) = totals();
    let cpu = process_cpu_secs()? - c0;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "bench modbus: devices={} points/device={} poll={}ms change_every={}ms duration={:.1}s",
        a.devices, a.points, a.poll_interval_ms, a.change_every_ms, secs
    );
    println!(
        "  points polled: {} ({:.0} points/s), readings committed: {} ({:.0}/s), failed polls: {}",
        p1 - p0,
        (p1 - p0) as f64 / secs,
        w1 - w0,
        (w1 - w0) as f64 / secs,
        f1 - f0
    );
    println!("  node CPU (adapter + chain + API): {:.1}% of one core", 100.0 * cpu / secs);
    running.stop().await?;
    drop(sim);
    Ok(())
}
