//! Encrypted node links: TCP carrying the Noise protocol (`Noise_XX_25519_AESGCM_SHA256`,
//! crate `snow`). Each node has a static X25519 key; a link is kept only when the other
//! side's static key is on the allow-list (a permissioned chain). On top of Noise a link
//! carries messages of any size (split into Noise frames), heartbeats that detect half-open
//! connections, and in-band rekeying on a schedule and by message count.
//!
//! Wire format: every Noise message is preceded by its length (u16, big endian). The
//! plaintext of a transport message starts with one kind byte (see `Kind`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::keys::write_new_private;

/// The Noise pattern of every node link.
pub const NOISE_PATTERN: &str = "Noise_XX_25519_AESGCM_SHA256";
/// File name of the node's link key inside the data directory.
pub const LINK_KEY_FILE: &str = "link.key";
/// Largest Noise message (the protocol's limit).
const NOISE_MAX: usize = 65_535;
/// AES-GCM tag.
const TAG: usize = 16;
/// Largest payload of one transport frame after the kind byte.
const CHUNK: usize = NOISE_MAX - TAG - 1;
/// Largest message a link accepts; bigger ones close the link (a peer gone wrong).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A static X25519 key of a node link.
#[derive(Clone, Serialize, Deserialize)]
pub struct LinkKey {
    /// Private key (hex).
    private: String,
    /// Public key (hex): what other nodes put on their allow-list.
    public: String,
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkKey({})", self.public)
    }
}

fn params() -> snow::params::NoiseParams {
    // The pattern is a constant that parses; a failure would be a build defect.
    NOISE_PATTERN.parse().unwrap_or_else(|e| panic!("{NOISE_PATTERN}: {e:?}"))
}

fn noise_err(e: snow::Error) -> Error {
    Error::Link(format!("noise: {e}"))
}

impl LinkKey {
    /// A fresh random key pair.
    pub fn generate() -> Result<Self> {
        let kp = snow::Builder::new(params()).generate_keypair().map_err(noise_err)?;
        Ok(Self { private: hex::encode(kp.private), public: hex::encode(kp.public) })
    }

    /// Reads a key written by [`LinkKey::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let key: LinkKey = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not a link key file: {e}", path.display())))?;
        key.private_bytes()?;
        parse_public(&key.public).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(key)
    }

    /// Reads the key at `path`, creating it first when missing (nodes initialised before
    /// clusters existed have none).
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if !path.exists() {
            let key = LinkKey::generate()?;
            key.save(path)?;
        }
        LinkKey::load(path)
    }

    /// Writes the key to a new file readable by the owner only; never replaces one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Config(e.to_string()))?;
        write_new_private(path, &text)
    }

    /// The public key (hex).
    pub fn public_hex(&self) -> &str {
        &self.public
    }

    /// The public key.
    pub fn public(&self) -> Result<PeerKey> {
        parse_public(&self.public).map_err(Error::Config)
    }

    fn private_bytes(&self) -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(&self.private, &mut k)
            .map_err(|e| Error::Config(format!("link key: private key is not 64 hex digits: {e}")))?;
        Ok(k)
    }
}

/// A node's static link public key.
pub type PeerKey = [u8; 32];

/// Parses a 64-hex-digit link public key.
pub fn parse_public(hex_key: &str) -> std::result::Result<PeerKey, String> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut k)
        .map_err(|e| format!("link public key {hex_key:?} is not 64 hex digits: {e}"))?;
    Ok(k)
}

/// Timing and rekeying of links.
#[derive(Debug, Clone)]
pub struct LinkTuning {
    /// Interval of heartbeats on an idle link.
    pub heartbeat: Duration,
    /// A link that received nothing for this long is closed (half-open detection).
    pub dead_after: Duration,
    /// Each direction rekeys after this many messages...
    pub rekey_messages: u64,
    /// ...or after this long, whichever comes first.
    pub rekey_interval: Duration,
    /// Longest TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Source address of outgoing links (the listen address's IP, when it names one), so
    /// peers and firewalls see links come from the address this node is known by.
    pub bind: Option<std::net::IpAddr>,
}

impl Default for LinkTuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_secs(3),
            rekey_messages: 1 << 20,
            rekey_interval: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(3),
            bind: None,
        }
    }
}

/// What a node needs to open and accept links.
#[derive(Clone)]
pub struct LinkIdentity {
    key: LinkKey,
    /// Static keys allowed at the other end.
    pub allow: Arc<RwLock<HashSet<PeerKey>>>,
    /// Bound into every handshake so nodes of different chains never link.
    prologue: Vec<u8>,
    /// Timing.
    pub tuning: LinkTuning,
}

impl std::fmt::Debug for LinkIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkIdentity").field("key", &self.key).field("allowed", &self.allow.read().len()).finish()
    }
}

impl LinkIdentity {
    /// An identity for `chain` with `key`, allowing `allow`.
    pub fn new(key: LinkKey, chain: &str, allow: impl IntoIterator<Item = PeerKey>, tuning: LinkTuning) -> Self {
        let mut prologue = b"kalima-link-v1\0".to_vec();
        prologue.extend_from_slice(chain.as_bytes());
        Self { key, allow: Arc::new(RwLock::new(allow.into_iter().collect())), prologue, tuning }
    }

    /// This node's public link key.
    pub fn public(&self) -> Result<PeerKey> {
        self.key.public()
    }
}

/// Frame kinds inside the Noise transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Part of a message; more parts follow.
    More = 0,
    /// The last (or only) part of a message.
    Last = 1,
    /// Heartbeat; the dialing side sends them, the accepting side answers.
    Ping = 2,
    /// Heartbeat answer.
    Pong = 3,
    /// The sender switched to a new sending key after this frame.
    Rekey = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::More,
            1 => Kind::Last,
            2 => Kind::Ping,
            3 => Kind::Pong,
            4 => Kind::Rekey,
            _ => return None,
        })
    }
}

/// An established link: messages in both directions, to one authenticated peer.
#[derive(Debug)]
pub struct Link {
    /// The peer's static key (checked against the allow-list).
    pub peer: PeerKey,
    /// Messages to send; closing it closes the link.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Messages received; ends when the link closes.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

async fn write_noise(w: &mut OwnedWriteHalf, msg: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(msg.len() + 2);
    buf.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    buf.extend_from_slice(msg);
    w.write_all(&buf).await
}

async fn read_noise(r: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    r.read_exact(buf).await?;
    Ok(())
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Link(format!("{what}: {e}"))
}

/// Opens a link to `addr`, authenticating both sides.
pub async fn connect(id: &LinkIdentity, addr: &str) -> Result<Link> {
    let fut = async {
        let stream = dial(addr, id.tuning.bind).await.map_err(|e| io_err(&format!("connecting to {addr}"), e))?;
        handshake(id, stream, true).await
    };
    tokio::time::timeout(id.tuning.connect_timeout, fut)
        .await
        .map_err(|_| Error::Link(format!("connecting to {addr}: timed out")))?
}

async fn dial(addr: &str, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind else { return TcpStream::connect(addr).await };
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        if target.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr} has no address of the family of {ip}"))))
}

/// Completes the responder side of a handshake on an accepted connection.
pub async fn accept(id: &LinkIdentity, stream: TcpStream) -> Result<Link> {
    tokio::time::timeout(id.tuning.connect_timeout, handshake(id, stream, false))
        .await
        .map_err(|_| Error::Link("handshake timed out".into()))?
}

async fn handshake(id: &LinkIdentity, stream: TcpStream, initiator: bool) -> Result<Link> {
    let _ = stream.set_nodelay(true);
    let private = id.key.private_bytes()?;
    let builder = snow::Builder::new(params())
        .local_private_key(&private)
        .map_err(noise_err)?
        .prologue(&id.prologue)
        .map_err(noise_err)?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }.map_err(noise_err)?;
    let (mut r, mut w) = stream.into_split();
    let mut msg = vec![0u8; NOISE_MAX];
    let mut buf = Vec::new();
    let mut scratch = vec![0u8; NOISE_MAX];
    // XX: -> e; <- e, ee, s, es; -> s, se.
    while !hs.is_handshake_finished() {
        if hs.is_my_turn() {
            let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
            write_noise(&mut w, &msg[..n]).await.map_err(|e| io_err("handshake", e))?;
        } else {
            read_noise(&mut r, &mut buf).await.map_err(|e| io_err("handshake", e))?;
            hs.read_message(&buf, &mut scratch).map_err(noise_err)?;
        }
    }
    let peer: PeerKey = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| Error::Link("the peer sent no static key".into()))?;
    if !id.allow.read().contains(&peer) {
        metrics::counter!("kalima_link_refused_total").increment(1);
        return Err(Error::Link(format!("peer key {} is not on the allow-list", hex::encode(peer))));
    }
    let transport = hs.into_transport_mode().map_err(noise_err)?;
    Ok(spawn_link(id, transport, r, w, peer, initiator))
}

/// Sending half of the transport state, shared by the writer task and the pong replies.
struct Sender {
    noise: Arc<Mutex<snow::TransportState>>,
    sent: u64,
    keyed_at: Instant,
    tuning: LinkTuning,
}

impl Sender {
    fn frame(&mut self, kind: Kind, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut plain = Vec::with_capacity(payload.len() + 1);
        plain.push(kind as u8);
        plain.extend_from_slice(payload);
        let mut cipher = vec![0u8; plain.len() + TAG];
        let n = self.noise.lock().write_message(&plain, &mut cipher).map_err(noise_err)?;
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&cipher[..n]);
        Ok(())
    }

    /// Encrypts one message (and a rekey frame when due) into `out`.
    fn message(&mut self, msg: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut chunks = msg.chunks(CHUNK).peekable();
        if msg.is_empty() {
            self.frame(Kind::Last, &[], out)?;
        }
        while let Some(c) = chunks.next() {
            let kind = if chunks.peek().is_some() { Kind::More } else { Kind::Last };
            self.frame(kind, c, out)?;
        }
        self.sent += 1;
        self.maybe_rekey(out)
    }

    fn maybe_rekey(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if self.sent >= self.tuning.rekey_messages || self.keyed_at.elapsed() >= self.tuning.rekey_interval {
            self.frame(Kind::Rekey, &[], out)?;
            self.noise.lock().rekey_outgoing();
            self.sent = 0;
            self.keyed_at = Instant::now();
            metrics::counter!("kalima_link_rekeys_total").increment(1);
        }
        Ok(())
    }
}

fn spawn_link(
    id: &LinkIdentity,
    transport: snow::TransportState,
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    peer: PeerKey,
    initiator: bool,
) -> Link {
    let noise = Arc::new(Mutex::new(transport));
    let tuning = id.tuning.clone();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(256);
    // Pongs are queued by the reader and sent by the writer, which owns the sending state.
    let (pong_tx, mut pong_rx) = mpsc::channel::<()>(4);

    let mut sender = Sender { noise: noise.clone(), sent: 0, keyed_at: Instant::now(), tuning: tuning.clone() };
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tuning.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        loop {
            out.clear();
            tokio::select! {
                m = out_rx.recv() => match m {
                    Some(m) => {
                        if sender.message(&m, &mut out).is_err() { break; }
                        // Drain what is already queued into the same write.
                        while out.len() < 1 << 20 {
                            match out_rx.try_recv() {
                                Ok(m) => if sender.message(&m, &mut out).is_err() { return; },
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some(()) = pong_rx.recv() => {
                    if sender.frame(Kind::Pong, &[], &mut out).is_err() { break; }
                }
                _ = tick.tick() => {
                    if initiator && sender.frame(Kind::Ping, &[], &mut out).is_err() { break; }
                    // Time-based rekey also happens on idle links.
                    if sender.maybe_rekey(&mut out).is_err() { break; }
                }
            }
            if !out.is_empty() && w.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });

    let dead_after = id.tuning.dead_after;
    let peer_hex = hex::encode(peer);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut plain = vec![0u8; NOISE_MAX];
        let mut message: Vec<u8> = Vec::new();
        let reason = loop {
            match tokio::time::timeout(dead_after, read_noise(&mut r, &mut buf)).await {
                Err(_) => {
                    metrics::counter!("kalima_link_timeouts_total").increment(1);
                    break format!("nothing received for {dead_after:?}");
                }
                Ok(Err(e)) => break format!("read: {e}"),
                Ok(Ok(())) => {}
            }
            let n = match noise.lock().read_message(&buf, &mut plain) {
                Ok(n) => n,
                Err(e) => break format!("decrypt: {e}"),
            };
            let Some((&kind, payload)) = plain[..n].split_first() else {
                break "empty frame".to_string();
            };
            match Kind::from_byte(kind) {
                Some(Kind::More) | Some(Kind::Last) => {
                    if message.len() + payload.len() > MAX_MESSAGE {
                        break format!("message over {MAX_MESSAGE} bytes");
                    }
                    message.extend_from_slice(payload);
                    if kind == Kind::Last as u8 && in_tx.send(std::mem::take(&mut message)).await.is_err() {
                        break "closed".to_string();
                    }
                }
                Some(Kind::Ping) => {
                    let _ = pong_tx.try_send(());
                }
                Some(Kind::Pong) => {}
                Some(Kind::Rekey) => noise.lock().rekey_incoming(),
                None => break format!("unknown frame kind {kind}"),
            }
        };
        tracing::debug!(target: "core::cluster", peer = %peer_hex, reason, "Link closed.");
        writer.abort();
    });
    Link { peer, tx: out_tx, rx: in_rx }
}
