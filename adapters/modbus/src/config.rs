//! `[modbus]` configuration: the devices to poll, how to reach them, and their register maps.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// `[modbus]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModbusSection {
    /// Kalima device the readings are written as, unless a device names its own.
    pub kalima_device: String,
    /// The field devices to poll.
    pub devices: Vec<DeviceConfig>,
}

impl Default for ModbusSection {
    fn default() -> Self {
        Self { kalima_device: "modbus".into(), devices: Vec::new() }
    }
}

/// How a field device is reached.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Modbus TCP (`host`).
    #[default]
    Tcp,
    /// Modbus RTU over a serial line (`serial_port`).
    Rtu,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// `[[modbus.devices]]`: one field device (a PLC, a meter, a gateway to an RTU bus).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Name used in logs, the status API and set-point URLs.
    pub name: String,
    /// Kalima device the readings are written as (default: `[modbus] kalima_device`).
    pub kalima_device: Option<String>,
    /// `tcp` or `rtu`.
    pub transport: Transport,
    /// TCP: `host:port`.
    pub host: String,
    /// RTU: serial device path.
    pub serial_port: String,
    /// RTU: bits per second.
    pub baud_rate: u32,
    /// RTU: parity.
    pub parity: Parity,
    /// RTU: data bits (7 or 8).
    pub data_bits: u8,
    /// RTU: stop bits (1 or 2).
    pub stop_bits: u8,
    /// Modbus unit (slave) id.
    pub unit_id: u8,
    /// Address the points write to unless a point names its own.
    pub address: String,
    /// Milliseconds between polls of the points that do not set their own interval.
    pub poll_interval_ms: u64,
    /// A request not answered within this is a failure (and the connection is reopened).
    pub timeout_ms: u64,
    /// Longest wait between reconnection attempts (the wait doubles from `poll_interval_ms`).
    pub backoff_max_ms: u64,
    /// Unused registers (or bits) one request may read across to join two points.
    pub max_gap: u16,
    /// Largest request, in registers (at most 125) or bits (at most 2000).
    pub max_registers_per_request: u16,
    /// The register map.
    pub points: Vec<PointConfig>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kalima_device: None,
            transport: Transport::Tcp,
            host: String::new(),
            serial_port: String::new(),
            baud_rate: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            unit_id: 1,
            address: String::new(),
            poll_interval_ms: 1000,
            timeout_ms: 1000,
            backoff_max_ms: 30_000,
            max_gap: 0,
            max_registers_per_request: 125,
            points: Vec::new(),
        }
    }
}

/// Modbus table a point lives in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Read/write bits (function 1; written with 5/15).
    Coil,
    /// Read-only bits (function 2).
    DiscreteInput,
    /// Read/write 16-bit registers (function 3; written with 6/16).
    HoldingRegister,
    /// Read-only 16-bit registers (function 4).
    InputRegister,
}

impl Function {
    /// Whether the table holds single bits.
    pub fn is_bits(self) -> bool {
        matches!(self, Function::Coil | Function::DiscreteInput)
    }

    /// Whether clients may write it.
    pub fn is_writable(self) -> bool {
        matches!(self, Function::Coil | Function::HoldingRegister)
    }

    /// Largest read one request may make in this table (Modbus application protocol 1.1b3).
    pub fn protocol_max(self) -> u16 {
        if self.is_bits() { 2000 } else { 125 }
    }

    /// Name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Function::Coil => "coil",
            Function::DiscreteInput => "discrete_input",
            Function::HoldingRegister => "holding_register",
            Function::InputRegister => "input_register",
        }
    }
}

/// How a point's registers are read as a value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// A coil or discrete input, or a register that is non-zero.
    Bool,
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Four registers, unsigned.
    U64,
    /// Four registers, two's complement.
    I64,
    /// Two registers, IEEE 754 single precision.
    F32,
    /// Four registers, IEEE 754 double precision.
    F64,
    /// `count` registers of text, two bytes each; trailing NULs and spaces dropped.
    String,
}

impl DataType {
    /// Registers the type spans (`count` for strings).
    pub fn registers(self, count: Option<u16>) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => count.unwrap_or(0),
        }
    }

    /// Whether values are numbers (scale, offset and deadband apply).
    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::String)
    }
}

/// Byte order inside a register, or register order inside a multi-register value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Most significant first (the Modbus default).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// `[[modbus.devices.points]]`: one value in a device's register map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PointConfig {
    /// Key the value is written under.
    pub key: String,
    /// Address written to (default: the device's `address`).
    pub address: Option<String>,
    /// Table: `coil`, `discrete_input`, `holding_register`, `input_register`.
    pub function: Function,
    /// First register (or bit), 0-based protocol address.
    pub register: u16,
    /// Value type.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Registers of a `string`.
    pub count: Option<u16>,
    /// Byte order inside each register.
    pub byte_order: Order,
    /// Register order of 32- and 64-bit values.
    pub word_order: Order,
    /// Value = raw * scale + offset.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Unit written beside the value.
    pub unit: String,
    /// Absent: write every poll. Set: write only when the value moved by more than this
    /// since the last write (0: on any change).
    pub deadband: Option<f64>,
    /// Rewrite an unchanged value after this many seconds, so stable and stale differ (0: never).
    pub refresh_secs: u64,
    /// Milliseconds between polls of this point (default: the device's).
    pub poll_interval_ms: Option<u64>,
    /// Whether authorized devices may write set-points to it over REST.
    pub writable: bool,
}

impl Default for PointConfig {
    fn default() -> Self {
        Self {
            key: String::new(),
            address: None,
            function: Function::HoldingRegister,
            register: 0,
            data_type: DataType::U16,
            count: None,
            byte_order: Order::Big,
            word_order: Order::Big,
            scale: 1.0,
            offset: 0.0,
            unit: String::new(),
            deadband: None,
            refresh_secs: 0,
            poll_interval_ms: None,
            writable: false,
        }
    }
}

impl PointConfig {
    /// Registers (or bits) the point spans.
    pub fn len(&self) -> u16 {
        if self.function.is_bits() { 1 } else { self.data_type.registers(self.count) }
    }

    /// Whether the point spans nothing (only a misconfigured string).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the last register, in u32 so the end of the table does not overflow.
    pub fn end(&self) -> u32 {
        u32::from(self.register) + u32::from(self.len())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl DeviceConfig {
    /// Address of `point`.
    pub fn point_address<'a>(&'a self, point: &'a PointConfig) -> &'a str {
        point.address.as_deref().unwrap_or(&self.address)
    }

    /// Poll interval of `point`.
    pub fn point_interval_ms(&self, point: &PointConfig) -> u64 {
        point.poll_interval_ms.unwrap_or(self.poll_interval_ms)
    }
}

impl ModbusSection {
    /// Every problem in the section, each naming the device and point it is in.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !self.devices.is_empty() && kalima_core::registry::validate_device_id(&self.kalima_device).is_err() {
            errs.push(format!("[modbus] kalima_device = {:?} is not a valid device id", self.kalima_device));
        }
        let mut names = HashSet::new();
        let mut targets = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let at = if d.name.is_empty() {
                format!("[[modbus.devices]] #{}", i + 1)
            } else {
                format!("modbus device {:?}", d.name)
            };
            if !valid_name(&d.name) {
                errs.push(format!("{at}: name must be 1-64 of A-Z a-z 0-9 - _ ."));
            } else if !names.insert(d.name.clone()) {
                errs.push(format!("{at}: name is used twice"));
            }
            if let Some(k) = &d.kalima_device
                && kalima_core::registry::validate_device_id(k).is_err()
            {
                errs.push(format!("{at}: kalima_device = {k:?} is not a valid device id"));
            }
            match d.transport {
                Transport::Tcp => {
                    if d.host.is_empty() || !d.host.contains(':') {
                        errs.push(format!("{at}: transport = \"tcp\" needs host = \"HOST:PORT\""));
                    }
                }
                Transport::Rtu => {
                    if d.serial_port.is_empty() {
                        errs.push(format!("{at}: transport = \"rtu\" needs serial_port"));
                    }
                    if d.baud_rate == 0 {
                        errs.push(format!("{at}: baud_rate must be positive"));
                    }
                    if !matches!(d.data_bits, 7 | 8) {
                        errs.push(format!("{at}: data_bits must be 7 or 8"));
                    }
                    if !matches!(d.stop_bits, 1 | 2) {
                        errs.push(format!("{at}: stop_bits must be 1 or 2"));
                    }
                    if d.unit_id == 0 || d.unit_id > 247 {
                        errs.push(format!("{at}: unit_id on a serial line must be 1..=247 (0 is broadcast)"));
                    }
                }
            }
            if d.poll_interval_ms < 10 {
                errs.push(format!("{at}: poll_interval_ms must be at least 10"));
            }
            if d.timeout_ms < 10 {
                errs.push(format!("{at}: timeout_ms must be at least 10"));
            }
            if d.backoff_max_ms < d.poll_interval_ms {
                errs.push(format!("{at}: backoff_max_ms must be at least poll_interval_ms"));
            }
            if d.max_registers_per_request == 0 || d.max_registers_per_request > 125 {
                errs.push(format!("{at}: max_registers_per_request must be 1..=125"));
            }
            if d.points.is_empty() {
                errs.push(format!("{at}: no points; add [[modbus.devices.points]]"));
            }
            for p in &d.points {
                let pat = format!("{at}, point {:?}", p.key);
                errs.extend(validate_point(d, p).into_iter().map(|e| format!("{pat}: {e}")));
                if !targets.insert((d.point_address(p).to_string(), p.key.clone())) {
                    errs.push(format!(
                        "{pat}: address {:?} key {:?} is written by another point",
                        d.point_address(p),
                        p.key
                    ));
                }
            }
        }
        errs
    }
}

fn validate_point(d: &DeviceConfig, p: &PointConfig) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = kalima_core::tx::validate_key(&p.key) {
        errs.push(e.to_string());
    }
    let address = d.point_address(p);
    if address.is_empty() {
        errs.push("no address: set address on the point or its device".into());
    } else if let Err(e) = kalima_core::tx::validate_address(address) {
        errs.push(e.to_string());
    } else if kalima_core::registry::is_system_address(address) {
        errs.push(format!("address {address:?} is reserved for the node"));
    }
    if p.function.is_bits() && p.data_type != DataType::Bool {
        errs.push(format!("function {} holds bits: type must be \"bool\"", p.function.as_str()));
    }
    if p.data_type == DataType::String {
        match p.count {
            Some(c) if (1..=125).contains(&c) => {}
            _ => errs.push("type \"string\" needs count = 1..=125 registers".into()),
        }
    } else if p.count.is_some() {
        errs.push("count applies to type \"string\" only".into());
    }
    if p.len() > d.max_registers_per_request && !p.function.is_bits() {
        errs.push(format!("spans {} registers, more than max_registers_per_request", p.len()));
    }
    if p.end() > 65_536 {
        errs.push("runs past register 65535".into());
    }
    if !p.scale.is_finite() || p.scale == 0.0 {
        errs.push("scale must be a finite non-zero number".into());
    }
    if !p.offset.is_finite() {
        errs.push("offset must be finite".into());
    }
    if let Some(db) = p.deadband
        && (!db.is_finite() || db < 0.0)
    {
        errs.push("deadband must be a finite number >= 0".into());
    }
    if p.poll_interval_ms.is_some_and(|ms| ms < 10) {
        errs.push("poll_interval_ms must be at least 10".into());
    }
    if p.writable && !p.function.is_writable() {
        errs.push(format!("writable = true needs a coil or holding_register, not {}", p.function.as_str()));
    }
    if p.writable && p.data_type == DataType::String {
        errs.push("string points cannot be written".into());
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> ModbusSection {
        #[derive(Deserialize)]
        struct Root {
            modbus: ModbusSection,
        }
        let root: Root = toml::from_str(toml_text).unwrap();
        root.modbus
    }

    #[test]
    fn documented_example_parses_and_validates() {
        let s = parse(include_str!("../example.toml"));
        assert_eq!(s.devices.len(), 2);
        assert_eq!(s.validate(), Vec::<String>::new());
        let rtu = &s.devices[1];
        assert_eq!(rtu.transport, Transport::Rtu);
        assert_eq!(rtu.parity, Parity::Even);
        assert!(s.devices[0].points.iter().any(|p| p.writable));
    }

    #[test]
    fn every_mistake_is_reported_with_its_place() {
        let s = parse(
            r#"
            [modbus]
            [[modbus.devices]]
            name = "plc 1"
            transport = "rtu"
            unit_id = 0
            address = "/plant"
            [[modbus.devices.points]]
            key = "temp"
            function = "coil"
            type = "f32"
            [[modbus.devices.points]]
            key = "label"
            type = "string"
            [[modbus.devices.points]]
            key = "temp"
            register = 65535
            type = "u32"
            writable = true
            function = "input_register"
            "#,
        );
        let errs = s.validate();
        let all = errs.join("\n");
        for want in [
            "name must be",
            "needs serial_port",
            "unit_id on a serial line",
            "holds bits: type must be \"bool\"",
            "needs count",
            "runs past register 65535",
            "is written by another point",
            "writable = true needs a coil or holding_register",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }
}
