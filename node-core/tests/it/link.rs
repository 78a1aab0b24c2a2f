//! Node links (Noise_XX over TCP): allow-list, chain binding, large messages, rekeying,
//! half-open detection and garbage on the wire. Storage-free, so not per backend.

use std::time::Duration;

use kalima_core::cluster::link::{self, Link, LinkIdentity, LinkKey, LinkTuning, PeerKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn key() -> (LinkKey, PeerKey) {
    let k = LinkKey::generate().unwrap();
    let p = k.public().unwrap();
    (k, p)
}

fn quick() -> LinkTuning {
    LinkTuning {
        heartbeat: Duration::from_millis(50),
        dead_after: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(2),
        ..LinkTuning::default()
    }
}

/// Accepts one link on a fresh port; the result arrives on the returned channel.
async fn accept_one(id: LinkIdentity) -> (String, tokio::sync::oneshot::Receiver<kalima_core::Result<Link>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let _ = tx.send(link::accept(&id, s).await);
    });
    (addr, rx)
}

#[tokio::test]
async fn allowed_peers_exchange_messages_of_any_size_both_ways() {
    let ((ka, pa), (kb, pb)) = (key(), key());
    let a = LinkIdentity::new(ka, "chain-x", [pb], quick());
    let b = LinkIdentity::new(kb, "chain-x", [pa], quick());
    let (addr, accepted) = accept_one(b).await;
    let mut la = link::connect(&a, &addr).await.unwrap();
    let mut lb = accepted.await.unwrap().unwrap();
    assert_eq!(la.peer, pb, "the dialer authenticated the acceptor's static key");
    assert_eq!(lb.peer, pa, "the acceptor authenticated the dialer's static key");

    // Empty, small, and several Noise frames' worth (the Noise limit is 65535 bytes).
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for m in [Vec::new(), b"hello".to_vec(), big.clone()] {
        la.tx.send(m.clone()).await.unwrap();
        assert_eq!(lb.rx.recv().await.unwrap(), m);
        lb.tx.send(m.clone()).await.unwrap();
        assert_eq!(la.rx.recv().await.unwrap(), m);
    }
}

#[tokio::test]
async fn keys_off_the_allow_list_are_refused_on_both_sides() {
    let ((ka, pa), (kb, _pb), (kc, pc)) = (key(), key(), key());
    // B allows only C: A's link is refused by the acceptor.
    let b = LinkIdentity::new(kb.clone(), "chain-x", [pc], quick());
    let (addr, accepted) = accept_one(b).await;
    let dialed = link::connect(&LinkIdentity::new(ka, "chain-x", [], quick()), &addr).await;
    let err = accepted.await.unwrap().expect_err("B must refuse A");
    assert!(err.to_string().contains("not on the allow-list"), "{err}");
    // A does not allow B either: the dialer refuses too.
    assert!(dialed.is_err(), "A must refuse B's key");

    // C allowed by B, but C does not allow B: refused by the dialer.
    let b = LinkIdentity::new(kb, "chain-x", [pc, pa], quick());
    let (addr, _accepted) = accept_one(b).await;
    let c = LinkIdentity::new(kc, "chain-x", [], quick());
    let err = link::connect(&c, &addr).await.expect_err("C must refuse B");
    assert!(err.to_string().contains("not on the allow-list"), "{err}");
}

#[tokio::test]
async fn nodes_of_another_chain_cannot_link() {
    let ((ka, pa), (kb, pb)) = (key(), key());
    let a = LinkIdentity::new(ka, "chain-x", [pb], quick());
    let b = LinkIdentity::new(kb, "chain-y", [pa], quick());
    let (addr, accepted) = accept_one(b).await;
    assert!(link::connect(&a, &addr).await.is_err(), "different prologues must fail the handshake");
    assert!(accepted.await.unwrap().is_err());
}

#[tokio::test]
async fn traffic_keeps_flowing_across_many_rekeys() {
    let ((ka, pa), (kb, pb)) = (key(), key());
    let tuning = LinkTuning { rekey_messages: 3, ..quick() };
    let a = LinkIdentity::new(ka, "chain-x", [pb], tuning.clone());
    let b = LinkIdentity::new(kb, "chain-x", [pa], tuning);
    let (addr, accepted) = accept_one(b).await;
    let mut la = link::connect(&a, &addr).await.unwrap();
    let mut lb = accepted.await.unwrap().unwrap();
    // 200 messages each way = dozens of key changes per direction; a wrong rekey would make
    // the next frame undecryptable and close the link.
    for i in 0..200u32 {
        la.tx.send(i.to_be_bytes().to_vec()).await.unwrap();
        lb.tx.send(i.to_le_bytes().to_vec()).await.unwrap();
    }
    for i in 0..200u32 {
        assert_eq!(lb.rx.recv().await.unwrap(), i.to_be_bytes().to_vec());
        assert_eq!(la.rx.recv().await.unwrap(), i.to_le_bytes().to_vec());
    }
}

#[tokio::test]
async fn a_silent_peer_is_detected_and_the_link_closes() {
    let ((ka, pa), (kb, pb)) = (key(), key());
    let a = LinkIdentity::new(ka, "chain-x", [pb], quick());
    let b = LinkIdentity::new(kb, "chain-x", [pa], quick());
    let (addr, accepted) = accept_one(b).await;
    // A relay that can go silent without closing anything: a half-open connection.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let (silence_tx, silence) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (mut inbound, _) = relay.accept().await.unwrap();
        let mut outbound = TcpStream::connect(addr).await.unwrap();
        let mut silence = silence;
        let (mut buf_a, mut buf_b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                n = inbound.read(&mut buf_a) => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if !*silence.borrow() {
                        outbound.write_all(&buf_a[..n]).await.unwrap();
                    }
                }
                n = outbound.read(&mut buf_b) => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if !*silence.borrow() {
                        inbound.write_all(&buf_b[..n]).await.unwrap();
                    }
                }
                _ = silence.changed() => {}
            }
        }
        // Keep both sockets open and silent.
        std::future::pending::<()>().await;
    });
    let mut la = link::connect(&a, &relay_addr).await.unwrap();
    let mut lb = accepted.await.unwrap().unwrap();
    la.tx.send(b"before".to_vec()).await.unwrap();
    assert_eq!(lb.rx.recv().await.unwrap(), b"before");
    silence_tx.send(true).unwrap();
    // Both ends notice within a few heartbeats (dead_after = 400 ms); the bound only keeps a
    // broken detector from hanging the test.
    let closed_a = tokio::time::timeout(Duration::from_secs(20), async { while la.rx.recv().await.is_some() {} }).await;
    let closed_b = tokio::time::timeout(Duration::from_secs(20), async { while lb.rx.recv().await.is_some() {} }).await;
    assert!(closed_a.is_ok() && closed_b.is_ok(), "a half-open link was not closed");
}

#[tokio::test]
async fn garbage_on_the_wire_closes_only_that_connection() {
    let ((kb, _pb), (ka, pa)) = (key(), key());
    let b = LinkIdentity::new(kb, "chain-x", [pa], quick());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let b2 = b.clone();
    let acceptor = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (s, _) = l.accept().await.unwrap();
            results.push(link::accept(&b2, s).await.map(|l| l.peer));
        }
        results
    });
    // Random bytes where a handshake should be.
    let mut junk = TcpStream::connect(&addr).await.unwrap();
    junk.write_all(&[0x00, 0x05, 1, 2, 3, 4, 5, 0xff, 0xff]).await.unwrap();
    junk.shutdown().await.unwrap();
    // A proper peer afterwards still gets in.
    let a = LinkIdentity::new(ka, "chain-x", [b.public().unwrap()], quick());
    let good = link::connect(&a, &addr).await;
    let results = acceptor.await.unwrap();
    assert!(results[0].is_err(), "the junk connection must be refused");
    assert_eq!(results[1].as_ref().ok(), Some(&pa));
    assert!(good.is_ok());
}
