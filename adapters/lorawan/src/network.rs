//! The LoRaWAN 1.0.x network side: sessions, uplink MIC and 32-bit frame counters, payload
//! decryption, and OTAA joins. Frame parsing, MICs, encryption and key derivation are the
//! `lorawan` crate's; this module keeps the state around them.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use lorawan::keys::{AES128, AppKey};
use lorawan::parser::{DataHeader, DataPayload, DecryptedJoinAcceptPayload, DevNonce, FRMPayload, PhyPayload};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Activation, DeviceConfig, LorawanSection, hex_bytes};

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a LoRaWAN 1.0 PHYPayload.
    #[error("not a LoRaWAN PHYPayload: {0}")]
    Malformed(String),
    /// A downlink or join accept sent up.
    #[error("{0} is not an uplink")]
    NotUplink(&'static str),
    /// No configured or joined device has this DevAddr.
    #[error("no device with DevAddr {0}")]
    UnknownDevAddr(String),
    /// The MIC does not match any device with this DevAddr.
    #[error("MIC check failed for DevAddr {0}")]
    BadMic(String),
    /// The frame counter did not advance.
    #[error("frame counter {got} of {device} is not above the last accepted {last} (replay)")]
    Replay {
        /// Device name.
        device: String,
        /// Last accepted counter.
        last: u32,
        /// Counter of this frame.
        got: u32,
    },
    /// The counter would pass 2^32.
    #[error("frame counter of {0} is exhausted; the device must rejoin")]
    CounterExhausted(String),
    /// A join request from an unknown DevEUI.
    #[error("join request from unknown DevEUI {0}")]
    UnknownDevEui(String),
    /// A join request whose AppEUI does not match the device's.
    #[error("join request of {device} names AppEUI {got}, not the configured one")]
    WrongAppEui {
        /// Device name.
        device: String,
        /// AppEUI in the request.
        got: String,
    },
    /// A join request whose MIC does not match the AppKey.
    #[error("join request MIC check failed for {0}")]
    JoinBadMic(String),
    /// A DevNonce seen before (a replayed join request).
    #[error("DevNonce {nonce:04x} of {device} was already used (replayed join request)")]
    DevNonceReused {
        /// Device name.
        device: String,
        /// The nonce.
        nonce: u16,
    },
}

impl FrameError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Malformed(_) => "malformed_phy",
            FrameError::NotUplink(_) => "not_uplink",
            FrameError::UnknownDevAddr(_) => "unknown_dev_addr",
            FrameError::BadMic(_) => "bad_mic",
            FrameError::Replay { .. } => "replay",
            FrameError::CounterExhausted(_) => "counter_exhausted",
            FrameError::UnknownDevEui(_) => "unknown_dev_eui",
            FrameError::WrongAppEui { .. } => "wrong_app_eui",
            FrameError::JoinBadMic(_) => "join_bad_mic",
            FrameError::DevNonceReused { .. } => "dev_nonce_reused",
        }
    }
}

/// Keys and counters of an active session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// DevAddr, most significant byte first.
    #[serde(with = "hex::serde")]
    pub dev_addr: [u8; 4],
    /// Network session key.
    #[serde(with = "hex::serde")]
    pub nwk_skey: [u8; 16],
    /// Application session key.
    #[serde(with = "hex::serde")]
    pub app_skey: [u8; 16],
    /// Last accepted uplink counter.
    #[serde(skip)]
    pub fcnt_up: Option<u32>,
    /// Counter of the next downlink (devices refuse a downlink counter that does not advance).
    /// On disk: the counter reserved up to, so a restart never reuses one.
    #[serde(default)]
    pub fcnt_down: u32,
    /// Counters below this are reserved on disk.
    #[serde(skip)]
    pub reserved_down: u32,
}

/// What an accepted frame asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// A data uplink, verified and decrypted.
    Data {
        /// Index of the device in the config.
        device: usize,
        /// Its full 32-bit frame counter.
        fcnt: u32,
        /// FPort (`None`: no payload).
        fport: Option<u8>,
        /// Decrypted FRMPayload (empty for MAC-only frames).
        payload: Vec<u8>,
        /// Confirmed data up.
        confirmed: bool,
    },
    /// A join: send `accept` in the join-accept window.
    Join {
        /// Index of the device in the config.
        device: usize,
        /// The encrypted JoinAccept PHYPayload.
        accept: Vec<u8>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedDevice {
    session: Option<Session>,
    dev_nonces: BTreeSet<u16>,
}

#[derive(Debug)]
struct DeviceState {
    name: String,
    dev_eui: [u8; 8],
    otaa: Option<([u8; 8], [u8; 16])>,
    session: Option<Session>,
    dev_nonces: BTreeSet<u16>,
}

/// Sessions of every configured device.
#[derive(Debug)]
pub struct Network {
    devices: Vec<DeviceState>,
    by_addr: HashMap<[u8; 4], Vec<usize>>,
    by_eui: HashMap<[u8; 8], usize>,
    net_id: [u8; 3],
    sessions_path: Option<PathBuf>,
}

/// Downlink counters reserved on disk at a time.
const DOWNLINK_RESERVATION: u32 = 64;

/// MHDR, AppNonce, NetID, DevAddr, DLSettings, RxDelay and MIC: a join accept without CFList.
const JOIN_ACCEPT_LEN: usize = 17;

/// Counter eras (65,536 frames each) searched for a device's first frame.
const FIRST_FRAME_ERAS: u32 = 64;

fn rev<const N: usize>(mut b: [u8; N]) -> [u8; N] {
    b.reverse();
    b
}

fn wire<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    <[u8; N]>::try_from(b).ok().map(rev)
}

impl Network {
    /// Sessions from the (validated) config, with OTAA sessions restored from `sessions_path`.
    pub fn new(section: &LorawanSection, sessions_path: Option<PathBuf>) -> Network {
        let saved: HashMap<String, SavedDevice> = sessions_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut net = Network {
            devices: Vec::new(),
            by_addr: HashMap::new(),
            by_eui: HashMap::new(),
            net_id: hex_bytes::<3>(&section.net_id).unwrap_or_default(),
            sessions_path,
        };
        for (i, d) in section.devices.iter().enumerate() {
            let dev_eui = hex_bytes::<8>(&d.dev_eui).unwrap_or_default();
            let (otaa, session, dev_nonces) = match d.activation {
                Activation::Abp => {
                    let mut s = abp_session(d);
                    // The downlink counter survives restarts as long as the DevAddr is unchanged.
                    let saved_down = saved
                        .get(&d.dev_eui.to_ascii_lowercase())
                        .and_then(|x| x.session.as_ref())
                        .filter(|x| s.as_ref().is_some_and(|s| s.dev_addr == x.dev_addr))
                        .map(|x| x.fcnt_down);
                    if let (Some(s), Some(f)) = (s.as_mut(), saved_down) {
                        s.fcnt_down = f;
                        s.reserved_down = f;
                    }
                    (None, s, BTreeSet::new())
                }
                Activation::Otaa => {
                    let s = saved.get(&d.dev_eui.to_ascii_lowercase());
                    (
                        Some((
                            hex_bytes::<8>(&d.app_eui).unwrap_or_default(),
                            hex_bytes::<16>(&d.app_key).unwrap_or_default(),
                        )),
                        s.and_then(|s| s.session.clone()).map(|mut s| {
                            s.reserved_down = s.fcnt_down;
                            s
                        }),
                        s.map(|s| s.dev_nonces.clone()).unwrap_or_default(),
                    )
                }
            };
            if let Some(s) = &session {
                net.by_addr.entry(s.dev_addr).or_default().push(i);
            }
            net.by_eui.insert(dev_eui, i);
            net.devices.push(DeviceState { name: d.name.clone(), dev_eui, otaa, session, dev_nonces });
        }
        net
    }

    /// The session of device `i`, if it has one.
    pub fn session(&self, i: usize) -> Option<&Session> {
        self.devices.get(i).and_then(|d| d.session.as_ref())
    }

    /// Sets the last accepted counter of device `i` (restored from the chain at start).
    pub fn restore_fcnt(&mut self, i: usize, dev_addr: [u8; 4], fcnt: u32) {
        if let Some(s) = self.devices.get_mut(i).and_then(|d| d.session.as_mut())
            && s.dev_addr == dev_addr
        {
            s.fcnt_up = Some(s.fcnt_up.map_or(fcnt, |f| f.max(fcnt)));
        }
    }

    /// Verifies and opens one uplink PHYPayload.
    pub fn handle(&mut self, phy: &[u8]) -> Result<Accepted, FrameError> {
        match lorawan::parser::parse(phy.to_vec()) {
            Ok(PhyPayload::Data(DataPayload::Encrypted(enc))) => {
                if !enc.is_uplink() {
                    return Err(FrameError::NotUplink("a data downlink"));
                }
                self.data(enc)
            }
            Ok(PhyPayload::Data(DataPayload::Decrypted(_))) => Err(FrameError::Malformed("unexpected form".into())),
            Ok(PhyPayload::JoinRequest(jr)) => self.join(&jr),
            Ok(PhyPayload::JoinAccept(_)) => Err(FrameError::NotUplink("a join accept")),
            Err(e) => Err(FrameError::Malformed(format!("{e:?}"))),
        }
    }

    fn data(
        &mut self,
        enc: lorawan::parser::EncryptedDataPayload<Vec<u8>, lorawan::default_crypto::DefaultFactory>,
    ) -> Result<Accepted, FrameError> {
        let fhdr = enc.fhdr();
        let addr = wire::<4>(fhdr.dev_addr().as_ref()).unwrap_or_default();
        let f16 = u32::from(fhdr.fcnt());
        let addr_hex = hex::encode_upper(addr);
        let candidates = self.by_addr.get(&addr).cloned().unwrap_or_default();
        if candidates.is_empty() {
            return Err(FrameError::UnknownDevAddr(addr_hex));
        }
        for i in candidates {
            let Some(s) = self.devices[i].session.clone() else { continue };
            let nwk = AES128(s.nwk_skey);
            let fcnt = match s.fcnt_up {
                // No counter known yet (a new ABP device, or one whose frames never reached the
                // chain): the 16 bits on air may belong to a later era, so search a few.
                None => {
                    match (0..=FIRST_FRAME_ERAS).map(|era| (era << 16) | f16).find(|c| enc.validate_mic(&nwk, *c)) {
                        Some(c) => c,
                        None => continue,
                    }
                }
                Some(last) => {
                    let same_era = (last & 0xFFFF_0000) | f16;
                    if same_era > last {
                        same_era
                    } else if enc.validate_mic(&nwk, same_era) {
                        // The MIC matches an old counter: this exact frame was accepted before.
                        return Err(FrameError::Replay { device: self.devices[i].name.clone(), last, got: same_era });
                    } else {
                        // The 16 bits on air wrapped: the counter moved into the next era.
                        match same_era.checked_add(0x1_0000) {
                            Some(next) => next,
                            None => return Err(FrameError::CounterExhausted(self.devices[i].name.clone())),
                        }
                    }
                }
            };
            if !enc.validate_mic(&nwk, fcnt) {
                continue;
            }
            let confirmed = enc.is_confirmed();
            let fport = enc.f_port();
            let app = AES128(s.app_skey);
            let dec = enc
                .decrypt(Some(&nwk), Some(&app), fcnt)
                .map_err(|e| FrameError::Malformed(format!("cannot decrypt: {e:?}")))?;
            let payload = match dec.frm_payload() {
                FRMPayload::Data(d) => d.to_vec(),
                _ => Vec::new(),
            };
            if let Some(sess) = self.devices[i].session.as_mut() {
                sess.fcnt_up = Some(fcnt);
            }
            return Ok(Accepted::Data { device: i, fcnt, fport, payload, confirmed });
        }
        Err(FrameError::BadMic(addr_hex))
    }

    fn join(
        &mut self,
        jr: &lorawan::parser::JoinRequestPayload<Vec<u8>, lorawan::default_crypto::DefaultFactory>,
    ) -> Result<Accepted, FrameError> {
        let dev_eui = wire::<8>(jr.dev_eui().as_ref()).unwrap_or_default();
        let eui_hex = hex::encode_upper(dev_eui);
        let i = *self.by_eui.get(&dev_eui).ok_or_else(|| FrameError::UnknownDevEui(eui_hex.clone()))?;
        let name = self.devices[i].name.clone();
        let Some((app_eui, app_key)) = self.devices[i].otaa else {
            return Err(FrameError::UnknownDevEui(format!("{eui_hex} (configured for ABP)")));
        };
        let got_app_eui = wire::<8>(jr.app_eui().as_ref()).unwrap_or_default();
        if got_app_eui != app_eui {
            return Err(FrameError::WrongAppEui { device: name, got: hex::encode_upper(got_app_eui) });
        }
        if !jr.validate_mic(&AES128(app_key)) {
            return Err(FrameError::JoinBadMic(name));
        }
        let nonce_wire: [u8; 2] = <[u8; 2]>::try_from(jr.dev_nonce().as_ref()).unwrap_or_default();
        let nonce = u16::from_le_bytes(nonce_wire);
        if self.devices[i].dev_nonces.contains(&nonce) {
            return Err(FrameError::DevNonceReused { device: name, nonce });
        }
        let mut rng = rand::thread_rng();
        let app_nonce: [u8; 3] = rng.r#gen();
        // DevAddr = 7-bit NwkID (the NetID's low bits) and 25 random bits, unique among devices.
        let nwk_id = u32::from(self.net_id[2] & 0x7f);
        let dev_addr = loop {
            let a = ((nwk_id << 25) | (rng.r#gen::<u32>() & 0x01ff_ffff)).to_be_bytes();
            if !self.by_addr.contains_key(&a) {
                break a;
            }
        };
        let mut creator = lorawan::creator::JoinAcceptCreator::new();
        creator.set_app_nonce(&app_nonce);
        creator.set_net_id(&rev(self.net_id));
        creator.set_dev_addr(&rev(dev_addr));
        creator.set_dl_settings(0);
        creator.set_rx_delay(1);
        let accept = creator
            .build(&AES128(app_key))
            .map_err(|e| FrameError::Malformed(format!("cannot build join accept: {e:?}")))?
            // The creator's buffer has room for a CFList; without one the accept is 17 bytes.
            .get(..JOIN_ACCEPT_LEN)
            .unwrap_or_default()
            .to_vec();
        let key = AppKey::from(app_key);
        let opened = DecryptedJoinAcceptPayload::new(accept.clone(), &key)
            .map_err(|e| FrameError::Malformed(format!("cannot open own join accept: {e:?}")))?;
        let dn = DevNonce::from(nonce_wire);
        let session = Session {
            dev_addr,
            nwk_skey: opened.derive_newskey(&dn, &key).inner().0,
            app_skey: opened.derive_appskey(&dn, &key).inner().0,
            fcnt_up: None,
            fcnt_down: 0,
            reserved_down: 0,
        };
        let d = &mut self.devices[i];
        if let Some(old) = d.session.replace(session)
            && let Some(v) = self.by_addr.get_mut(&old.dev_addr)
        {
            v.retain(|&x| x != i);
        }
        d.dev_nonces.insert(nonce);
        self.by_addr.entry(dev_addr).or_default().push(i);
        self.save();
        Ok(Accepted::Join { device: i, accept })
    }

    /// An unconfirmed data downlink with the ACK bit for device `i` (answering a confirmed
    /// uplink), using and saving the next downlink counter.
    pub fn ack_downlink(&mut self, i: usize) -> Option<Vec<u8>> {
        let s = self.devices.get_mut(i)?.session.as_mut()?;
        let fcnt = s.fcnt_down;
        s.fcnt_down = s.fcnt_down.checked_add(1)?;
        // Counters are reserved on disk in blocks, so most downlinks cost no file write.
        let reserve = fcnt >= s.reserved_down;
        if reserve {
            s.reserved_down = fcnt.saturating_add(DOWNLINK_RESERVATION);
        }
        let (addr, nwk, app) = (rev(s.dev_addr), s.nwk_skey, s.app_skey);
        let mut fctrl = lorawan::parser::FCtrl::new(0, false);
        fctrl.set_ack();
        let mut c = lorawan::creator::DataPayloadCreator::new();
        c.set_uplink(false).set_confirmed(false).set_dev_addr(&addr).set_fctrl(&fctrl).set_fcnt(fcnt);
        let phy =
            c.build(&[], &[], &lorawan::keys::NewSKey::from(nwk), &lorawan::keys::AppSKey::from(app)).ok()?.to_vec();
        if reserve {
            self.save();
        }
        Some(phy)
    }

    /// Writes the sessions (OTAA keys, used DevNonces, downlink counters), atomically,
    /// readable by the owner only.
    fn save(&self) {
        let Some(path) = &self.sessions_path else { return };
        let saved: HashMap<String, SavedDevice> = self
            .devices
            .iter()
            .filter(|d| d.session.is_some() || d.otaa.is_some())
            .map(|d| {
                let session = d.session.clone().map(|mut s| {
                    s.fcnt_down = s.reserved_down.max(s.fcnt_down);
                    s
                });
                (hex::encode(d.dev_eui), SavedDevice { session, dev_nonces: d.dev_nonces.clone() })
            })
            .collect();
        let res = (|| -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            let body = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            std::io::Write::write_all(&mut f, &body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = res {
            tracing::warn!(target: "adapter::lorawan", path = %path.display(), error = %e, "Cannot save LoRaWAN sessions.");
        }
    }
}

fn abp_session(d: &DeviceConfig) -> Option<Session> {
    Some(Session {
        dev_addr: hex_bytes::<4>(&d.dev_addr)?,
        nwk_skey: hex_bytes::<16>(&d.nwk_skey)?,
        app_skey: hex_bytes::<16>(&d.app_skey)?,
        fcnt_up: None,
        fcnt_down: 0,
        reserved_down: 0,
    })
}
