//! Turns a register map into the fewest read requests it allows: points of one table and one
//! poll interval are joined while the span stays within the request limit and the unused
//! registers between them stay within `max_gap`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{DeviceConfig, Function};

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Table read.
    pub function: Function,
    /// First register (or bit).
    pub start: u16,
    /// Registers (or bits) read.
    pub count: u16,
    /// Indices into the device's `points`.
    pub points: Vec<usize>,
}

/// Requests polled together on one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Time between polls.
    pub interval: Duration,
    /// The requests of one poll.
    pub requests: Vec<ReadRequest>,
}

/// The poll schedules of `device`, shortest interval first.
pub fn plan(device: &DeviceConfig) -> Vec<Schedule> {
    let mut groups: BTreeMap<(u64, Function), Vec<usize>> = BTreeMap::new();
    for (i, p) in device.points.iter().enumerate() {
        groups.entry((device.point_interval_ms(p), p.function)).or_default().push(i);
    }
    let mut schedules: BTreeMap<u64, Vec<ReadRequest>> = BTreeMap::new();
    for ((interval, function), mut idx) in groups {
        let limit = if function.is_bits() {
            u32::from(function.protocol_max())
        } else {
            u32::from(device.max_registers_per_request.min(function.protocol_max()))
        };
        idx.sort_by_key(|&i| (device.points[i].register, device.points[i].end()));
        let out = schedules.entry(interval).or_default();
        let mut cur: Option<(u32, u32, Vec<usize>)> = None;
        for i in idx {
            let p = &device.points[i];
            let (start, end) = (u32::from(p.register), p.end());
            cur = match cur.take() {
                Some((s, e, mut pts)) if start <= e + u32::from(device.max_gap) && end.max(e) - s <= limit => {
                    pts.push(i);
                    Some((s, e.max(end), pts))
                }
                prev => {
                    if let Some(done) = prev {
                        out.push(request(function, done));
                    }
                    Some((start, end, vec![i]))
                }
            };
        }
        if let Some(done) = cur {
            out.push(request(function, done));
        }
    }
    schedules.into_iter().map(|(ms, requests)| Schedule { interval: Duration::from_millis(ms), requests }).collect()
}

fn request(function: Function, (start, end, points): (u32, u32, Vec<usize>)) -> ReadRequest {
    // Validation keeps every point inside 0..=65535 and within the limit, so these fit.
    ReadRequest {
        function,
        start: u16::try_from(start).unwrap_or(u16::MAX),
        count: u16::try_from(end - start).unwrap_or(u16::MAX),
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataType, PointConfig};

    fn pt(key: &str, function: Function, register: u16, t: DataType) -> PointConfig {
        PointConfig { key: key.into(), function, register, data_type: t, ..PointConfig::default() }
    }

    fn device(points: Vec<PointConfig>, max_gap: u16) -> DeviceConfig {
        DeviceConfig { name: "d".into(), address: "/a".into(), max_gap, points, ..DeviceConfig::default() }
    }

    #[test]
    fn adjacent_points_share_a_request_and_gaps_split_them() {
        use DataType::*;
        use Function::*;
        let d = device(
            vec![
                pt("a", HoldingRegister, 0, F32),
                pt("b", HoldingRegister, 2, U16),
                pt("c", HoldingRegister, 5, U16),
                pt("d", InputRegister, 0, U16),
                pt("e", Coil, 0, Bool),
                pt("f", Coil, 1999, Bool),
            ],
            0,
        );
        let s = plan(&d);
        assert_eq!(s.len(), 1);
        let r: Vec<_> = s[0].requests.iter().map(|r| (r.function, r.start, r.count, r.points.clone())).collect();
        assert_eq!(
            r,
            vec![
                (Coil, 0, 1, vec![4]),
                (Coil, 1999, 1, vec![5]),
                (HoldingRegister, 0, 3, vec![0, 1]),
                (HoldingRegister, 5, 1, vec![2]),
                (InputRegister, 0, 1, vec![3]),
            ]
        );
        // Allowing a gap of two registers joins the holding registers into one read.
        let s = plan(&device(d.points.clone(), 2));
        assert_eq!(s[0].requests.iter().filter(|r| r.function == HoldingRegister).count(), 1);
        // Bits join across a gap too, up to the 2000-bit limit of one request.
        let s = plan(&device(d.points.clone(), 1998));
        let coils: Vec<_> = s[0].requests.iter().filter(|r| r.function == Coil).map(|r| r.count).collect();
        assert_eq!(coils, vec![2000]);
    }

    #[test]
    fn requests_respect_the_size_limit_and_intervals() {
        let mut points: Vec<_> =
            (0..200).map(|i| pt(&format!("r{i}"), Function::HoldingRegister, i, DataType::U16)).collect();
        points[0].poll_interval_ms = Some(100);
        let s = plan(&device(points, 0));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].interval, Duration::from_millis(100));
        assert_eq!(s[0].requests.len(), 1);
        let counts: Vec<u16> = s[1].requests.iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![125, 74]);
    }

    #[test]
    fn overlapping_views_of_the_same_registers_are_read_once() {
        let d = device(
            vec![
                pt("word", Function::HoldingRegister, 10, DataType::U32),
                pt("low", Function::HoldingRegister, 11, DataType::U16),
            ],
            0,
        );
        let s = plan(&d);
        assert_eq!(
            s[0].requests,
            vec![ReadRequest { function: Function::HoldingRegister, start: 10, count: 2, points: vec![0, 1] }]
        );
    }
}
