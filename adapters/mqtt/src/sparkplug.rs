//! Sparkplug B host application: decodes edge-node payloads (protobuf), keeps each edge
//! node's birth certificate (bdSeq, metric aliases) and message sequence, asks for a rebirth
//! on a gap or on data from a node it has no birth for, and maps metrics to transactions.

use std::collections::{BTreeMap, HashMap};

use kalima_core::tx::TxContent;
use serde::{Deserialize, Serialize};

/// Shortest time between two rebirth requests to one edge node.
const REBIRTH_INTERVAL_MS: u64 = 5_000;

/// Topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// `[mqtt.sparkplug]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SparkplugSection {
    /// Act as a Sparkplug B host application on the external broker.
    pub enabled: bool,
    /// Host application id published in `spBv1.0/STATE/<host_id>`.
    pub host_id: String,
    /// Address prefix: metrics go to `<prefix>/<group>/<edge node>[/<device>]`.
    pub address_prefix: String,
}

impl Default for SparkplugSection {
    fn default() -> Self {
        Self { enabled: false, host_id: "kalima".into(), address_prefix: "/sparkplug".into() }
    }
}

/// The Sparkplug B payload (the fields this host reads; others are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// Metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// Message sequence, 0-255.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    /// Payload UUID.
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    /// Opaque body.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// Name (births carry it; data may carry only the alias).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Alias from the birth certificate.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the epoch.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// Sparkplug data type.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// Historical value (not the current one).
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// Not to be stored.
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// Explicit null.
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// The value.
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// Scalar metric values (data sets, templates and extensions are not decoded).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    /// Int8/16/32 (two's complement) and UInt8/16/32.
    #[prost(uint32, tag = "10")]
    Int(u32),
    /// Int64 (two's complement), UInt64, DateTime.
    #[prost(uint64, tag = "11")]
    Long(u64),
    /// Float.
    #[prost(float, tag = "12")]
    Float(f32),
    /// Double.
    #[prost(double, tag = "13")]
    Double(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    Boolean(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    String(String),
    /// Bytes, File.
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

/// Name of a Sparkplug data type.
pub fn datatype_name(t: u32) -> &'static str {
    match t {
        1 => "Int8",
        2 => "Int16",
        3 => "Int32",
        4 => "Int64",
        5 => "UInt8",
        6 => "UInt16",
        7 => "UInt32",
        8 => "UInt64",
        9 => "Float",
        10 => "Double",
        11 => "Boolean",
        12 => "String",
        13 => "DateTime",
        14 => "Text",
        15 => "UUID",
        16 => "DataSet",
        17 => "Bytes",
        18 => "File",
        19 => "Template",
        20 => "PropertySet",
        21 => "PropertySetList",
        22..=34 => "Array",
        _ => "Unknown",
    }
}

/// The JSON value of a metric of data type `t`.
pub fn json_value(t: u32, v: &Option<MetricValue>) -> serde_json::Value {
    use serde_json::Value as J;
    match (t, v) {
        (_, None) => J::Null,
        (1, Some(MetricValue::Int(i))) => (*i as u8 as i8).into(),
        (2, Some(MetricValue::Int(i))) => (*i as u16 as i16).into(),
        (3, Some(MetricValue::Int(i))) => (*i as i32).into(),
        (4, Some(MetricValue::Long(l))) => (*l as i64).into(),
        (_, Some(MetricValue::Int(i))) => (*i).into(),
        (_, Some(MetricValue::Long(l))) => (*l).into(),
        (_, Some(MetricValue::Float(f))) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        (_, Some(MetricValue::Double(d))) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
        (_, Some(MetricValue::Boolean(b))) => J::Bool(*b),
        (_, Some(MetricValue::String(s))) => J::String(s.clone()),
        (_, Some(MetricValue::Bytes(b))) => J::String(b.iter().map(|x| format!("{x:02x}")).collect()),
    }
}

/// Why a Sparkplug message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    /// Not a Sparkplug B topic.
    #[error("topic {0:?} is not spBv1.0/<group>/<type>/<edge node>[/<device>]")]
    Topic(String),
    /// The payload is not a Sparkplug B protobuf.
    #[error("payload is not a Sparkplug B protobuf: {0}")]
    Payload(String),
}

impl SparkplugError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SparkplugError::Topic(_) => "sparkplug_topic",
            SparkplugError::Payload(_) => "sparkplug_payload",
        }
    }
}

/// What the host must do after a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Commit these transactions.
    Write(Vec<TxContent>),
    /// Publish this NCMD (a rebirth request) to `topic`.
    Rebirth {
        /// `spBv1.0/<group>/NCMD/<edge node>`.
        topic: String,
        /// Encoded NCMD payload.
        payload: Vec<u8>,
    },
}

#[derive(Debug, Default)]
struct EdgeNode {
    online: bool,
    last_rebirth_ms: Option<u64>,
    bd_seq: Option<u64>,
    last_seq: Option<u8>,
    aliases: HashMap<u64, (String, u32)>,
    devices: HashMap<String, HashMap<u64, (String, u32)>>,
}

/// Per-edge-node state of the host application.
#[derive(Debug)]
pub struct Host {
    prefix: String,
    nodes: HashMap<(String, String), EdgeNode>,
}

/// Turns a Sparkplug id or metric name into a valid key or address segment.
fn clean(s: &str) -> String {
    let out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || " :.@+_-/".contains(c) { c } else { '_' }).collect();
    let out = out.trim_matches('/').to_string();
    if out.is_empty() { "_".into() } else { out }
}

fn segment(s: &str) -> String {
    clean(s).replace('/', "_")
}

/// The NCMD payload asking an edge node to republish its births.
pub fn rebirth_payload(now_ms: u64) -> Vec<u8> {
    let p = Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some("Node Control/Rebirth".into()),
            timestamp: Some(now_ms),
            datatype: Some(11),
            value: Some(MetricValue::Boolean(true)),
            ..Metric::default()
        }],
        seq: None,
        uuid: None,
        body: None,
    };
    prost::Message::encode_to_vec(&p)
}

impl Host {
    /// A host writing under `prefix`.
    pub fn new(prefix: &str) -> Host {
        Host { prefix: prefix.trim_end_matches('/').to_string(), nodes: HashMap::new() }
    }

    /// Whether the edge node is online (has a birth and no death since).
    pub fn is_online(&self, group: &str, edge: &str) -> bool {
        self.nodes.get(&(group.to_string(), edge.to_string())).is_some_and(|n| n.online)
    }

    /// Handles one message on `topic`; `now_ms` stamps rebirth requests.
    pub fn handle(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> Result<Vec<Action>, SparkplugError> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.first() != Some(&NAMESPACE) || parts.len() < 3 {
            return Err(SparkplugError::Topic(topic.into()));
        }
        if parts[1] == "STATE" {
            // Other host applications' state: nothing to record.
            return Ok(Vec::new());
        }
        if !(4..=5).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(SparkplugError::Topic(topic.into()));
        }
        let (group, kind, edge) = (parts[1], parts[2], parts[3]);
        let device = parts.get(4).copied();
        if matches!(kind, "NCMD" | "DCMD") {
            // Commands to edge nodes (ours or another host's): not data.
            return Ok(Vec::new());
        }
        let p: Payload = prost::Message::decode(payload).map_err(|e| SparkplugError::Payload(e.to_string()))?;
        let key = (group.to_string(), edge.to_string());
        let address = match device {
            None => format!("{}/{}/{}", self.prefix, segment(group), segment(edge)),
            Some(d) => format!("{}/{}/{}/{}", self.prefix, segment(group), segment(edge), segment(d)),
        };
        let node = self.nodes.entry(key).or_default();
        let seq = p.seq.map(|s| (s & 0xff) as u8);
        let mut actions = Vec::new();
        match (kind, device) {
            ("NBIRTH", None) => {
                node.online = true;
                node.last_seq = seq;
                node.bd_seq =
                    p.metrics.iter().find(|m| m.name.as_deref() == Some("bdSeq")).and_then(|m| match m.value {
                        Some(MetricValue::Long(l)) => Some(l),
                        Some(MetricValue::Int(i)) => Some(u64::from(i)),
                        _ => None,
                    });
                node.aliases = learn_aliases(&p.metrics);
                node.devices.clear();
                actions.push(Action::Write(metric_txs(&address, &p, &HashMap::new(), seq, Some(true))));
            }
            ("NDEATH", None) => {
                let bd = p.metrics.iter().find(|m| m.name.as_deref() == Some("bdSeq")).and_then(|m| match m.value {
                    Some(MetricValue::Long(l)) => Some(l),
                    Some(MetricValue::Int(i)) => Some(u64::from(i)),
                    _ => None,
                });
                // A death whose bdSeq does not match the current birth is a stale will: ignore it.
                if node.online && (bd.is_none() || bd == node.bd_seq) {
                    node.online = false;
                    let mut txs = vec![online_tx(&address, false)];
                    for d in node.devices.keys() {
                        txs.push(online_tx(&format!("{address}/{}", segment(d)), false));
                    }
                    node.devices.clear();
                    actions.push(Action::Write(txs));
                }
            }
            (_, _) if !node.online => {
                // Data, or a device birth, from a node whose birth we never saw.
                actions.extend(rebirth(node, group, edge, now_ms));
            }
            _ => {
                if let (Some(s), Some(last)) = (seq, node.last_seq)
                    && s != last.wrapping_add(1)
                {
                    // A gap: something was lost; only a rebirth restores a consistent state.
                    node.online = false;
                    actions.extend(rebirth(node, group, edge, now_ms));
                    return Ok(actions);
                }
                node.last_seq = seq.or(node.last_seq);
                match (kind, device) {
                    ("NDATA", None) => {
                        let aliases = node.aliases.clone();
                        actions.push(Action::Write(metric_txs(&address, &p, &aliases, seq, None)));
                    }
                    ("DBIRTH", Some(d)) => {
                        node.devices.insert(d.to_string(), learn_aliases(&p.metrics));
                        actions.push(Action::Write(metric_txs(&address, &p, &HashMap::new(), seq, Some(true))));
                    }
                    ("DDATA", Some(d)) => match node.devices.get(d).cloned() {
                        Some(aliases) => actions.push(Action::Write(metric_txs(&address, &p, &aliases, seq, None))),
                        None => actions.extend(rebirth(node, group, edge, now_ms)),
                    },
                    ("DDEATH", Some(d)) => {
                        node.devices.remove(d);
                        actions.push(Action::Write(vec![online_tx(&address, false)]));
                    }
                    _ => return Err(SparkplugError::Topic(topic.into())),
                }
            }
        }
        Ok(actions)
    }
}

fn metric_txs(
    address: &str,
    p: &Payload,
    aliases: &HashMap<u64, (String, u32)>,
    seq: Option<u8>,
    online: Option<bool>,
) -> Vec<TxContent> {
    let mut out = Vec::new();
    if let Some(o) = online {
        out.push(online_tx(address, o));
    }
    for m in &p.metrics {
        if m.is_transient == Some(true) || m.is_historical == Some(true) {
            continue;
        }
        let from_alias = m.alias.and_then(|a| aliases.get(&a));
        let Some(name) = m.name.clone().or_else(|| from_alias.map(|(n, _)| n.clone())) else { continue };
        let datatype = m.datatype.or_else(|| from_alias.map(|(_, t)| *t)).unwrap_or(0);
        let value = if m.is_null == Some(true) { serde_json::Value::Null } else { json_value(datatype, &m.value) };
        let mut props = BTreeMap::new();
        props.insert("source".to_string(), "sparkplug".to_string());
        if let Some(s) = seq {
            props.insert("sparkplug_seq".to_string(), s.to_string());
        }
        if let Some(a) = m.alias {
            props.insert("sparkplug_alias".to_string(), a.to_string());
        }
        let body = serde_json::json!({ "value": value, "datatype": datatype_name(datatype) });
        out.push(TxContent {
            address: address.to_string(),
            key: clean(&name),
            body: body.to_string().into_bytes(),
            props,
            client_time_ms: m.timestamp.or(p.timestamp).and_then(|t| i64::try_from(t).ok()),
            ..TxContent::default()
        });
    }
    out
}

/// A rebirth request, at most one per node per interval: a node streaming data without a
/// birth would otherwise be asked again on every message.
fn rebirth(node: &mut EdgeNode, group: &str, edge: &str, now_ms: u64) -> Option<Action> {
    if node.last_rebirth_ms.is_some_and(|t| now_ms.saturating_sub(t) < REBIRTH_INTERVAL_MS) {
        return None;
    }
    node.last_rebirth_ms = Some(now_ms);
    Some(Action::Rebirth { topic: format!("{NAMESPACE}/{group}/NCMD/{edge}"), payload: rebirth_payload(now_ms) })
}

fn learn_aliases(metrics: &[Metric]) -> HashMap<u64, (String, u32)> {
    metrics.iter().filter_map(|m| Some((m.alias?, (m.name.clone()?, m.datatype.unwrap_or(0))))).collect()
}

fn online_tx(address: &str, online: bool) -> TxContent {
    TxContent {
        address: address.to_string(),
        key: "online".into(),
        body: serde_json::json!({ "value": online }).to_string().into_bytes(),
        props: [("source".to_string(), "sparkplug".to_string())].into(),
        ..TxContent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: Option<&str>, alias: u64, datatype: u32, value: MetricValue) -> Metric {
        Metric {
            name: name.map(Into::into),
            alias: Some(alias),
            datatype: Some(datatype),
            value: Some(value),
            ..Metric::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
        prost::Message::encode_to_vec(&Payload { timestamp: Some(1), metrics, seq: Some(seq), uuid: None, body: None })
    }

    fn writes(a: &[Action]) -> Vec<(String, String, serde_json::Value)> {
        a.iter()
            .flat_map(|a| match a {
                Action::Write(t) => t.clone(),
                Action::Rebirth { .. } => Vec::new(),
            })
            .map(|t| (t.address, t.key, serde_json::from_slice(&t.body).unwrap()))
            .collect()
    }

    #[test]
    fn births_aliases_data_and_deaths() {
        let mut h = Host::new("/sparkplug");
        let birth = payload(
            0,
            vec![
                metric(Some("bdSeq"), 0, 8, MetricValue::Long(3)),
                metric(Some("Line/Temperature"), 1, 9, MetricValue::Float(21.5)),
                metric(Some("Count"), 2, 3, MetricValue::Int((-5i32) as u32)),
            ],
        );
        let a = h.handle("spBv1.0/plant/NBIRTH/edge-1", &birth, 0).unwrap();
        let w = writes(&a);
        assert!(w.contains(&("/sparkplug/plant/edge-1".into(), "online".into(), serde_json::json!({"value": true}))));
        assert!(w.contains(&(
            "/sparkplug/plant/edge-1".into(),
            "Line/Temperature".into(),
            serde_json::json!({"value": 21.5, "datatype": "Float"})
        )));
        assert!(w.iter().any(|(_, k, v)| k == "Count" && v["value"] == -5));
        // NDATA by alias only.
        let data =
            payload(1, vec![Metric { alias: Some(1), value: Some(MetricValue::Float(22.0)), ..Metric::default() }]);
        let w = writes(&h.handle("spBv1.0/plant/NDATA/edge-1", &data, 0).unwrap());
        assert_eq!(
            w,
            vec![(
                "/sparkplug/plant/edge-1".into(),
                "Line/Temperature".into(),
                serde_json::json!({"value": 22.0, "datatype": "Float"})
            )]
        );
        // A stale death (other bdSeq) is ignored; the matching one takes the node offline.
        let stale = payload(0, vec![metric(Some("bdSeq"), 0, 8, MetricValue::Long(2))]);
        assert!(h.handle("spBv1.0/plant/NDEATH/edge-1", &stale, 0).unwrap().is_empty());
        assert!(h.is_online("plant", "edge-1"));
        let death = payload(0, vec![metric(Some("bdSeq"), 0, 8, MetricValue::Long(3))]);
        let w = writes(&h.handle("spBv1.0/plant/NDEATH/edge-1", &death, 0).unwrap());
        assert_eq!(w, vec![("/sparkplug/plant/edge-1".into(), "online".into(), serde_json::json!({"value": false}))]);
        assert!(!h.is_online("plant", "edge-1"));
    }

    #[test]
    fn gaps_and_unknown_nodes_ask_for_a_rebirth() {
        let mut h = Host::new("/sp");
        let data = payload(5, vec![metric(Some("x"), 1, 3, MetricValue::Int(1))]);
        let a = h.handle("spBv1.0/g/NDATA/e", &data, 7).unwrap();
        let Action::Rebirth { topic, payload: p } = &a[0] else { panic!("{a:?}") };
        assert_eq!(topic, "spBv1.0/g/NCMD/e");
        let cmd: Payload = prost::Message::decode(&p[..]).unwrap();
        assert_eq!(cmd.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(cmd.metrics[0].value, Some(MetricValue::Boolean(true)));
        h.handle("spBv1.0/g/NBIRTH/e", &payload(254, vec![]), 0).unwrap();
        // 254 -> 255 -> 0 wraps without a rebirth; 0 -> 2 is a gap.
        assert!(writes(&h.handle("spBv1.0/g/NDATA/e", &payload(255, vec![]), 0).unwrap()).is_empty());
        assert!(matches!(
            h.handle("spBv1.0/g/NDATA/e", &payload(0, vec![]), 0).unwrap().as_slice(),
            [Action::Write(_)]
        ));
        assert!(matches!(
            h.handle("spBv1.0/g/NDATA/e", &payload(2, vec![]), 10_000).unwrap().as_slice(),
            [Action::Rebirth { .. }]
        ));
        // Until the rebirth arrives, more data is not answered with more requests for a while.
        assert!(h.handle("spBv1.0/g/NDATA/e", &payload(3, vec![]), 12_000).unwrap().is_empty());
        assert_eq!(h.handle("spBv1.0/g/NDATA/e", &payload(4, vec![]), 15_001).unwrap().len(), 1);
        // A device whose DBIRTH was never seen also needs a rebirth.
        h.handle("spBv1.0/g/NBIRTH/e", &payload(0, vec![]), 0).unwrap();
        assert!(matches!(
            h.handle("spBv1.0/g/DDATA/e/d1", &payload(1, vec![]), 30_000).unwrap().as_slice(),
            [Action::Rebirth { .. }]
        ));
    }

    #[test]
    fn bad_topics_and_payloads_are_refused() {
        let mut h = Host::new("/sp");
        for t in ["spBv1.0/g", "spBv2.0/g/NDATA/e", "spBv1.0/g/NDATA/e/d/x", "spBv1.0/g/NDATA//"] {
            assert!(matches!(h.handle(t, &[], 0), Err(SparkplugError::Topic(_))), "{t}");
        }
        assert!(matches!(h.handle("spBv1.0/g/NBIRTH/e", &[0xff, 0xff, 0xff], 0), Err(SparkplugError::Payload(_))));
        assert!(h.handle("spBv1.0/STATE/other-host", b"{\"online\":true}", 0).unwrap().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), kind in 0usize..6) {
            let kinds = ["NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH"];
            let mut h = Host::new("/sp");
            let dev = if kind >= 3 { "/d" } else { "" };
            let _ = h.handle(&format!("spBv1.0/g/{}/e{dev}", kinds[kind]), &b, 0);
        }
    }
}
