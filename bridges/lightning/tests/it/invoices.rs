//! Creating and looking up invoices through `LndRest` over TLS with the macaroon: what comes
//! back is a valid BOLT11 invoice for exactly what was asked, and credentials are checked.

use std::time::Duration;

use kalima_bridge_lightning::lnd_standin::{Fault, LndStandin, Route};
use kalima_bridge_lightning::{
    Error, InvoiceBackend, InvoiceState, LightningSection, LndRest, Macaroon, NewInvoice, PaymentHash,
};
use lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescriptionRef, Currency};

use crate::{decode_with_npm_bolt11, within};

#[tokio::test]
async fn created_invoice_decodes_as_bolt11_with_both_decoders_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let memo = "Kalima feed /plant-1/line-2, 24 h";
    let invoice = lnd.create_invoice(NewInvoice::new(21_000_123, memo, 900)).await.unwrap();

    // What LND stored.
    assert_eq!(invoice.state, InvoiceState::Open);
    assert_eq!((invoice.value_msat, invoice.memo.as_str(), invoice.expiry_secs), (21_000_123, memo, 900));
    assert_eq!((invoice.add_index, invoice.settle_index, invoice.amt_paid_msat), (1, 0, 0));
    assert_eq!(standin.invoice(&invoice.payment_hash).as_ref(), Some(&invoice));

    // lightning-invoice: signature, amount, hash, description, expiry, timestamp, network.
    let bolt11: Bolt11Invoice = invoice.payment_request.parse().unwrap();
    assert_eq!(bolt11.currency(), Currency::Regtest);
    assert!(invoice.payment_request.starts_with("lnbcrt"));
    assert_eq!(bolt11.amount_milli_satoshis(), Some(21_000_123));
    let hash: &[u8] = bolt11.payment_hash().as_ref();
    assert_eq!(hash, invoice.payment_hash.as_bytes());
    match bolt11.description() {
        Bolt11InvoiceDescriptionRef::Direct(d) => assert_eq!(d.to_string(), memo),
        Bolt11InvoiceDescriptionRef::Hash(_) => panic!("expected a direct description"),
    }
    assert_eq!(bolt11.expiry_time(), Duration::from_secs(900));
    assert_eq!(bolt11.duration_since_epoch().as_secs(), invoice.creation_date);
    assert_eq!(hex::encode(bolt11.recover_payee_pub_key().serialize()), standin.node_public_key());

    // The independent npm decoder reads the same terms and the same signer.
    let npm = decode_with_npm_bolt11(&invoice.payment_request);
    assert_eq!(npm["network"], "bcrt");
    assert_eq!(npm["millisatoshis"], "21000123");
    assert_eq!(npm["payment_hash"], invoice.payment_hash.to_string());
    assert_eq!(npm["description"], memo);
    assert_eq!(npm["expire_time"], 900);
    assert_eq!(npm["timestamp"], invoice.creation_date);
    assert_eq!(npm["payee"], standin.node_public_key());
    assert_eq!(npm["min_final_cltv_expiry"], 80);
    assert_eq!(npm["payment_secret"], hex::encode(bolt11.payment_secret().0));
}

#[tokio::test]
async fn invoices_on_mainnet_use_the_lnbc_prefix_against_the_lnd_rest_standin() {
    let options =
        kalima_bridge_lightning::lnd_standin::StandinOptions { currency: Currency::Bitcoin, ..Default::default() };
    let standin = LndStandin::start_with(options).await.unwrap();
    let invoice = standin.client().unwrap().create_invoice(NewInvoice::new(1_000, "", 60)).await.unwrap();
    assert!(invoice.payment_request.starts_with("lnbc10n1"), "{}", invoice.payment_request);
    assert_eq!(decode_with_npm_bolt11(&invoice.payment_request)["network"], "bc");
}

#[tokio::test]
async fn lookup_of_an_unknown_hash_is_none_and_a_settled_invoice_shows_its_payment_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    assert_eq!(lnd.lookup_invoice(&PaymentHash([9; 32])).await.unwrap(), None);

    let first = lnd.create_invoice(NewInvoice::new(5_000, "a", 600)).await.unwrap();
    let second = lnd.create_invoice(NewInvoice::new(7_000, "b", 600)).await.unwrap();
    assert_eq!(second.add_index, 2);
    standin.settle(&second.payment_hash).unwrap();
    standin.settle(&first.payment_hash).unwrap();

    let second = lnd.lookup_invoice(&second.payment_hash).await.unwrap().unwrap();
    assert_eq!(second.state, InvoiceState::Settled);
    assert_eq!((second.settle_index, second.amt_paid_msat), (1, 7_000));
    assert!(second.settle_date >= second.creation_date);
    let first = lnd.lookup_invoice(&first.payment_hash).await.unwrap().unwrap();
    assert_eq!((first.state, first.settle_index, first.amt_paid_msat), (InvoiceState::Settled, 2, 5_000));
}

#[tokio::test]
async fn bad_invoice_requests_are_refused_before_sending_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    for bad in [NewInvoice::new(0, "x", 60), NewInvoice::new(1, "x", 0), NewInvoice::new(1, "m".repeat(640), 60)] {
        let err = lnd.create_invoice(bad.clone()).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
    }
    assert_eq!(standin.invoice(&PaymentHash([0; 32])), None);
    // Nothing reached the node: the next invoice is still the first.
    let inv = lnd.create_invoice(NewInvoice::new(1, "x", 60)).await.unwrap();
    assert_eq!(inv.add_index, 1);
}

#[tokio::test]
async fn a_wrong_or_missing_macaroon_is_refused_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let cert = standin.tls_cert_pem().as_bytes();
    let wrong = Macaroon::from_bytes(vec![2, 1, 2, 3]).unwrap();
    let lnd = LndRest::new(&standin.url(), &wrong, cert, Duration::from_secs(10)).unwrap();

    let err = lnd.create_invoice(NewInvoice::new(1_000, "x", 60)).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("verification failed"), "{err}");
    let err = lnd.lookup_invoice(&PaymentHash([1; 32])).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    let mut settled = lnd.subscribe_settled(3).await.unwrap();
    let err = within("refused stream", futures::StreamExt::next(&mut settled)).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Unauthorized { endpoint: "GET /v1/invoices/subscribe", .. }), "{err}");

    // Without the header at all, LND says how many macaroons it got. A raw client, not
    // `LndRest` (which always sends one), reads that answer; it need not check the certificate.
    let plain =
        reqwest::Client::builder().tls_built_in_root_certs(false).danger_accept_invalid_certs(true).build().unwrap();
    let resp = plain.get(format!("{}/v1/invoices", standin.url())).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"code": 2, "message": "expected 1 macaroon, got 0", "details": []}));
}

#[tokio::test]
async fn another_self_signed_certificate_is_refused_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let impostor = LndStandin::start().await.unwrap();
    // The right macaroon, but trusting another node's tls.cert: verification is on.
    let lnd =
        LndRest::new(&standin.url(), &standin.macaroon(), impostor.tls_cert_pem().as_bytes(), Duration::from_secs(10))
            .unwrap();
    let err = lnd.create_invoice(NewInvoice::new(1_000, "x", 60)).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
    assert!(
        err.to_string().contains("invalid peer certificate: Other(OtherError(the server's certificate is not the one in tls_cert_file, nor issued by it"),
        "{err}"
    );
    assert_eq!(standin.invoice(&PaymentHash([0; 32])), None);
    let err = lnd.lookup_invoice(&PaymentHash([1; 32])).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
}

/// Why `tls.cert` is pinned rather than only added as a root: LND's certificate is a CA
/// certificate (`CA:TRUE`), which webpki refuses as a server certificate.
#[tokio::test]
async fn an_lnd_like_ca_certificate_as_a_plain_root_is_refused_by_webpki_hence_the_pin_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let root = reqwest::Certificate::from_pem(standin.tls_cert_pem().as_bytes()).unwrap();
    let plain = reqwest::Client::builder().tls_built_in_root_certs(false).add_root_certificate(root).build().unwrap();
    let err = plain.get(format!("{}/v1/invoices", standin.url())).send().await.unwrap_err();
    let chain = format!("{:?}", err);
    assert!(chain.contains("CaUsedAsEndEntity"), "{chain}");
}

#[tokio::test]
async fn the_client_reads_lnds_files_from_the_config_section_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    standin.write_lnd_files(dir.path()).unwrap();
    let section = LightningSection {
        enabled: true,
        lnd_url: standin.url(),
        macaroon_file: "invoice.macaroon".into(),
        tls_cert_file: "tls.cert".into(),
        ..Default::default()
    };
    assert_eq!(section.validate(), Vec::<String>::new());
    let lnd = LndRest::from_section(&section, dir.path()).unwrap();
    let invoice = lnd.create_invoice(NewInvoice::new(3_000, "from files", section.invoice_expiry_secs)).await.unwrap();
    assert_eq!(invoice.expiry_secs, 3600);

    let hex_section =
        LightningSection { macaroon_file: String::new(), macaroon_hex: Some(standin.macaroon().to_hex()), ..section };
    let lnd = LndRest::from_section(&hex_section, dir.path()).unwrap();
    assert!(lnd.lookup_invoice(&invoice.payment_hash).await.unwrap().is_some());

    let missing = LightningSection { tls_cert_file: "nope.cert".into(), ..hex_section };
    let err = LndRest::from_section(&missing, dir.path()).unwrap_err().to_string();
    assert!(err.contains("nope.cert"), "{err}");
}

#[test]
fn the_readme_example_section_parses_and_validates() {
    #[derive(serde::Deserialize)]
    struct Root {
        lightning: LightningSection,
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```toml\n[lightning]").expect("README has a ```toml [lightning] example") + 8;
    let end = start + readme[start..].find("```").unwrap();
    let root: Root = toml::from_str(&readme[start..end]).unwrap();
    assert!(root.lightning.enabled);
    assert_eq!(root.lightning.validate(), Vec::<String>::new());
    let unknown = toml::from_str::<Root>("[lightning]\nlnd_uri = \"https://x\"\n");
    assert!(unknown.is_err(), "unknown keys are refused");
}

#[tokio::test]
async fn a_call_lnd_never_answers_times_out_and_the_next_one_works_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = LndRest::new(
        &standin.url(),
        &standin.macaroon(),
        standin.tls_cert_pem().as_bytes(),
        Duration::from_millis(300),
    )
    .unwrap();
    standin.inject(Route::LookupInvoice, Fault::Hang);
    let err = lnd.lookup_invoice(&PaymentHash([1; 32])).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { endpoint: "GET /v1/invoice/{r_hash_str}", timeout_ms: 300 }), "{err}");
    assert_eq!(err.to_string(), "LND GET /v1/invoice/{r_hash_str}: no answer within 300 ms");
    assert_eq!(lnd.lookup_invoice(&PaymentHash([1; 32])).await.unwrap(), None);
}
