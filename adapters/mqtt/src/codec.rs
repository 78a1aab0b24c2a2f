//! MQTT 3.1.1 and 5 packets, read and written with rumqttc's codecs, seen by the server
//! through one protocol-neutral shape.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes as m5;
use rumqttc::v5::mqttbytes::v5;

/// Protocol level of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (level 4).
    V4,
    /// MQTT 5 (level 5).
    V5,
}

/// Why bytes are not an MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The first packet is not a CONNECT.
    #[error("the first packet must be CONNECT")]
    NotConnect,
    /// A protocol level this server does not speak.
    #[error("protocol level {0} is not supported (MQTT 3.1.1 = 4, MQTT 5 = 5)")]
    Level(u8),
    /// Over the configured packet size.
    #[error("packet of {size} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Anything else the codec refused.
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// CONNECT.
    Connect {
        /// Client id.
        client_id: String,
        /// Keep-alive, seconds.
        keep_alive: u16,
        /// User name and password.
        login: Option<(String, String)>,
        /// Whether a will message was set (not supported).
        has_will: bool,
    },
    /// PUBLISH.
    Publish {
        /// 0, 1 or 2.
        qos: u8,
        /// Retransmission flag.
        dup: bool,
        /// Retain flag.
        retain: bool,
        /// Topic.
        topic: String,
        /// Packet id (QoS > 0).
        pkid: u16,
        /// Payload.
        payload: Bytes,
        /// MQTT 5 user properties.
        user_properties: Vec<(String, String)>,
    },
    /// PUBACK for a delivery.
    PubAck(u16),
    /// PUBREC for a delivery (not used: deliveries are at most QoS 1).
    PubRec(u16),
    /// PUBREL of a QoS 2 publish.
    PubRel(u16),
    /// PUBCOMP (not used).
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters with their requested QoS.
        filters: Vec<(String, u8)>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
    /// A packet only servers send.
    ServerOnly(&'static str),
}

/// Why a publish was refused (MQTT 5 reason codes; MQTT 3.1.1 has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x87.
    NotAuthorized,
    /// 0x90.
    TopicNameInvalid,
    /// 0x97.
    QuotaExceeded,
    /// 0x99.
    PayloadFormatInvalid,
    /// 0x80.
    Unspecified,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Unknown device, wrong token, revoked.
    BadUserNamePassword,
    /// Protocol level not supported.
    Version,
    /// Too many connections.
    ServerBusy,
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// CONNACK.
    ConnAck(Result<(), ConnRefusal>),
    /// PUBACK, with a refusal for MQTT 5.
    PubAck(u16, Option<Refusal>),
    /// PUBREC, with a refusal for MQTT 5.
    PubRec(u16, Option<Refusal>),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK: granted QoS or refused, per filter.
    SubAck(u16, Vec<Option<u8>>),
    /// UNSUBACK for `n` filters.
    UnsubAck(u16, usize),
    /// PINGRESP.
    PingResp,
    /// A delivery.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Bytes,
        /// 0 or 1.
        qos: u8,
        /// Packet id when QoS 1.
        pkid: u16,
    },
}

/// Finds the protocol level of the CONNECT at the start of `buf`; `Ok(None)` means more bytes are needed.
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, CodecError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect);
    }
    // Skip the remaining-length varint (1 to 4 bytes).
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(CodecError::Malformed("remaining length longer than 4 bytes".into()));
        }
    }
    // Protocol name: length-prefixed "MQTT" (or "MQIsdp" for 3.1), then the level byte.
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else { return Ok(None) };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    match buf.get(i + 2 + name_len) {
        Some(&level) => Ok(Some(level)),
        None if name_len > 6 => Err(CodecError::Malformed("protocol name longer than 6 bytes".into())),
        None => Ok(None),
    }
}

fn qos_u8(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5_u8(q: m5::QoS) -> u8 {
    q as u8
}

fn refusal5(r: Refusal) -> v5::PubAckReason {
    match r {
        Refusal::NotAuthorized => v5::PubAckReason::NotAuthorized,
        Refusal::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
        Refusal::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
        Refusal::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
        Refusal::Unspecified => v5::PubAckReason::UnspecifiedError,
    }
}

fn refusal5_rec(r: Refusal) -> v5::PubRecReason {
    match r {
        Refusal::NotAuthorized => v5::PubRecReason::NotAuthorized,
        Refusal::TopicNameInvalid => v5::PubRecReason::TopicNameInvalid,
        Refusal::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
        Refusal::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
        Refusal::Unspecified => v5::PubRecReason::UnspecifiedError,
    }
}

impl Version {
    /// Reads the next complete packet from `buf` (`Ok(None)`: more bytes needed).
    pub fn read(self, buf: &mut BytesMut, max: usize) -> Result<Option<Incoming>, CodecError> {
        let before = buf.len();
        match self.read_inner(buf, max) {
            // The codec consumed a whole frame and then found it short inside: that frame is
            // malformed, not incomplete (waiting would leave it unanswered forever).
            Ok(None) if buf.len() != before => Err(CodecError::Malformed("truncated field inside a packet".into())),
            other => other,
        }
    }

    fn read_inner(self, buf: &mut BytesMut, max: usize) -> Result<Option<Incoming>, CodecError> {
        match self {
            Version::V4 => match v4::Packet::read(buf, max) {
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                    Err(CodecError::TooLarge { size, max })
                }
                Err(e) => Err(CodecError::Malformed(e.to_string())),
                Ok(p) => Ok(Some(match p {
                    v4::Packet::Connect(c) => Incoming::Connect {
                        client_id: c.client_id,
                        keep_alive: c.keep_alive,
                        login: c.login.map(|l| (l.username, l.password)),
                        has_will: c.last_will.is_some(),
                    },
                    v4::Packet::Publish(p) => Incoming::Publish {
                        qos: qos_u8(p.qos),
                        dup: p.dup,
                        retain: p.retain,
                        topic: p.topic,
                        pkid: p.pkid,
                        payload: p.payload,
                        user_properties: Vec::new(),
                    },
                    v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
                    v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
                    v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                    v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                    v4::Packet::Subscribe(s) => Incoming::Subscribe {
                        pkid: s.pkid,
                        filters: s.filters.into_iter().map(|f| (f.path, qos_u8(f.qos))).collect(),
                    },
                    v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe { pkid: u.pkid, filters: u.topics },
                    v4::Packet::PingReq => Incoming::PingReq,
                    v4::Packet::Disconnect => Incoming::Disconnect,
                    v4::Packet::ConnAck(_) => Incoming::ServerOnly("CONNACK"),
                    v4::Packet::SubAck(_) => Incoming::ServerOnly("SUBACK"),
                    v4::Packet::UnsubAck(_) => Incoming::ServerOnly("UNSUBACK"),
                    v4::Packet::PingResp => Incoming::ServerOnly("PINGRESP"),
                })),
            },
            Version::V5 => {
                let limit = u32::try_from(max).unwrap_or(u32::MAX);
                match v5::Packet::read(buf, Some(limit)) {
                    Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                    Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                        Err(CodecError::TooLarge { size: pkt_size, max })
                    }
                    Err(e) => Err(CodecError::Malformed(e.to_string())),
                    Ok(p) => Ok(Some(match p {
                        v5::Packet::Connect(c, will, login) => Incoming::Connect {
                            client_id: c.client_id,
                            keep_alive: c.keep_alive,
                            login: login.map(|l| (l.username, l.password)),
                            has_will: will.is_some(),
                        },
                        v5::Packet::Publish(p) => Incoming::Publish {
                            qos: qos5_u8(p.qos),
                            dup: p.dup,
                            retain: p.retain,
                            topic: String::from_utf8(p.topic.to_vec())
                                .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?,
                            pkid: p.pkid,
                            payload: p.payload,
                            user_properties: p.properties.map(|pp| pp.user_properties).unwrap_or_default(),
                        },
                        v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
                        v5::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
                        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                        v5::Packet::Subscribe(s) => Incoming::Subscribe {
                            pkid: s.pkid,
                            filters: s.filters.into_iter().map(|f| (f.path, qos5_u8(f.qos))).collect(),
                        },
                        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe { pkid: u.pkid, filters: u.filters },
                        v5::Packet::PingReq(_) => Incoming::PingReq,
                        v5::Packet::Disconnect(_) => Incoming::Disconnect,
                        v5::Packet::ConnAck(_) => Incoming::ServerOnly("CONNACK"),
                        v5::Packet::SubAck(_) => Incoming::ServerOnly("SUBACK"),
                        v5::Packet::UnsubAck(_) => Incoming::ServerOnly("UNSUBACK"),
                        v5::Packet::PingResp(_) => Incoming::ServerOnly("PINGRESP"),
                        // Enhanced authentication is not offered, so a client must not send AUTH.
                        v5::Packet::Auth(_) => Incoming::ServerOnly("AUTH"),
                    })),
                }
            }
        }
    }

    /// Appends `p` to `out`.
    pub fn write(self, p: &Outgoing, out: &mut BytesMut) -> Result<(), CodecError> {
        let err = |e: String| CodecError::Malformed(e);
        match self {
            Version::V4 => {
                let pkt = match p {
                    Outgoing::ConnAck(r) => v4::Packet::ConnAck(v4::ConnAck::new(
                        match r {
                            Ok(()) => v4::ConnectReturnCode::Success,
                            Err(ConnRefusal::BadUserNamePassword) => v4::ConnectReturnCode::BadUserNamePassword,
                            Err(ConnRefusal::Version) => v4::ConnectReturnCode::RefusedProtocolVersion,
                            Err(ConnRefusal::ServerBusy) => v4::ConnectReturnCode::ServiceUnavailable,
                        },
                        false,
                    )),
                    // MQTT 3.1.1 has no negative acknowledgement; refusals go to kalima/errors/<device>.
                    Outgoing::PubAck(id, _) => v4::Packet::PubAck(v4::PubAck::new(*id)),
                    Outgoing::PubRec(id, _) => v4::Packet::PubRec(v4::PubRec::new(*id)),
                    Outgoing::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(*id)),
                    Outgoing::SubAck(id, codes) => v4::Packet::SubAck(v4::SubAck::new(
                        *id,
                        codes
                            .iter()
                            .map(|c| match c {
                                Some(0) => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
                                Some(_) => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                                None => v4::SubscribeReasonCode::Failure,
                            })
                            .collect(),
                    )),
                    Outgoing::UnsubAck(id, _) => v4::Packet::UnsubAck(v4::UnsubAck::new(*id)),
                    Outgoing::PingResp => v4::Packet::PingResp,
                    Outgoing::Publish { topic, payload, qos, pkid } => {
                        let mut p = v4::Publish::new(
                            topic.clone(),
                            if *qos == 0 {
                                rumqttc::mqttbytes::QoS::AtMostOnce
                            } else {
                                rumqttc::mqttbytes::QoS::AtLeastOnce
                            },
                            Vec::new(),
                        );
                        p.payload = payload.clone();
                        p.pkid = *pkid;
                        v4::Packet::Publish(p)
                    }
                };
                pkt.write(out, usize::MAX).map(|_| ()).map_err(|e| err(e.to_string()))
            }
            Version::V5 => {
                let pkt = match p {
                    Outgoing::ConnAck(r) => v5::Packet::ConnAck(v5::ConnAck {
                        session_present: false,
                        code: match r {
                            Ok(()) => v5::ConnectReturnCode::Success,
                            Err(ConnRefusal::BadUserNamePassword) => v5::ConnectReturnCode::BadUserNamePassword,
                            Err(ConnRefusal::Version) => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                            Err(ConnRefusal::ServerBusy) => v5::ConnectReturnCode::ServerBusy,
                        },
                        properties: None,
                    }),
                    Outgoing::PubAck(id, r) => {
                        let mut a = v5::PubAck::new(*id, None);
                        if let Some(r) = r {
                            a.reason = refusal5(*r);
                        }
                        v5::Packet::PubAck(a)
                    }
                    Outgoing::PubRec(id, r) => {
                        let mut a = v5::PubRec::new(*id, None);
                        if let Some(r) = r {
                            a.reason = refusal5_rec(*r);
                        }
                        v5::Packet::PubRec(a)
                    }
                    Outgoing::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(*id, None)),
                    Outgoing::SubAck(id, codes) => v5::Packet::SubAck(v5::SubAck {
                        pkid: *id,
                        return_codes: codes
                            .iter()
                            .map(|c| match c {
                                Some(0) => v5::SubscribeReasonCode::Success(m5::QoS::AtMostOnce),
                                Some(_) => v5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce),
                                None => v5::SubscribeReasonCode::NotAuthorized,
                            })
                            .collect(),
                        properties: None,
                    }),
                    Outgoing::UnsubAck(id, n) => v5::Packet::UnsubAck(v5::UnsubAck {
                        pkid: *id,
                        reasons: vec![v5::UnsubAckReason::Success; *n],
                        properties: None,
                    }),
                    Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
                    Outgoing::Publish { topic, payload, qos, pkid } => {
                        let mut p = v5::Publish::new(
                            topic.clone(),
                            if *qos == 0 { m5::QoS::AtMostOnce } else { m5::QoS::AtLeastOnce },
                            payload.clone(),
                            None,
                        );
                        p.pkid = *pkid;
                        v5::Packet::Publish(p)
                    }
                };
                pkt.write(out, None).map(|_| ()).map_err(|e| err(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_is_found_in_partial_and_whole_connects() {
        let mut c = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("dev-1")).write(&mut c, usize::MAX).unwrap();
        for n in 0..7 {
            assert_eq!(connect_level(&c[..n]), Ok(None), "{n} bytes");
        }
        assert_eq!(connect_level(&c), Ok(Some(4)));
        assert_eq!(connect_level(&[0x30, 0]), Err(CodecError::NotConnect));
        assert!(connect_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        let mut c5 = BytesMut::new();
        v5::Packet::Connect(
            v5::Connect { keep_alive: 10, client_id: "x".into(), clean_start: true, properties: None },
            None,
            None,
        )
        .write(&mut c5, None)
        .unwrap();
        assert_eq!(connect_level(&c5), Ok(Some(5)));
    }

    #[test]
    fn a_publish_reads_back_in_both_versions() {
        for v in [Version::V4, Version::V5] {
            let mut b = BytesMut::new();
            v.write(
                &Outgoing::Publish {
                    topic: "kalima/out/a/k".into(),
                    payload: Bytes::from_static(b"42"),
                    qos: 1,
                    pkid: 7,
                },
                &mut b,
            )
            .unwrap();
            // Half a packet is not a packet yet.
            let mut half = BytesMut::from(&b[..b.len() / 2]);
            assert_eq!(v.read(&mut half, 1 << 20), Ok(None));
            let Ok(Some(Incoming::Publish { qos, topic, pkid, payload, .. })) = v.read(&mut b, 1 << 20) else {
                panic!("{v:?}")
            };
            assert_eq!((qos, topic.as_str(), pkid, &payload[..]), (1, "kalima/out/a/k", 7, &b"42"[..]));
        }
    }

    #[test]
    fn oversized_and_garbage_packets_are_refused() {
        for v in [Version::V4, Version::V5] {
            let mut b = BytesMut::new();
            v.write(
                &Outgoing::Publish { topic: "t".into(), payload: Bytes::from(vec![0u8; 5000]), qos: 0, pkid: 0 },
                &mut b,
            )
            .unwrap();
            assert!(matches!(v.read(&mut b, 1000), Err(CodecError::TooLarge { .. })), "{v:?}");
            let mut g = BytesMut::from(&[0xf0u8, 0x02, 0xff, 0xff][..]);
            assert!(v.read(&mut g, 1000).is_err(), "{v:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = connect_level(&b);
            for v in [Version::V4, Version::V5] {
                let mut buf = BytesMut::from(&b[..]);
                let _ = v.read(&mut buf, 4096);
            }
        }
    }
}
