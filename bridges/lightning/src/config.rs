//! The `[lightning]` section of `kalima.toml`: how the node reaches its LND node, and the
//! defaults of the invoices it issues and of the settlement watcher.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[lightning]`: the LND node the marketplace issues BOLT11 invoices with. Off unless `enabled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LightningSection {
    /// Whether the node talks to LND at all.
    pub enabled: bool,
    /// LND's REST endpoint (`restlisten`), `https://` only.
    pub lnd_url: String,
    /// LND macaroon file (binary, as LND writes it), absolute or relative to the node directory.
    /// `invoice.macaroon` is enough: it may create and read invoices and nothing else.
    pub macaroon_file: String,
    /// The macaroon as hex, instead of `macaroon_file` (e.g. from an environment variable).
    pub macaroon_hex: Option<String>,
    /// LND's `tls.cert` (PEM), absolute or relative to the node directory.
    pub tls_cert_file: String,
    /// Seconds an invoice stays payable.
    pub invoice_expiry_secs: u64,
    /// Timeout of each non-streaming call, and of connecting, in ms.
    pub request_timeout_ms: u64,
    /// First wait before the settlement watcher subscribes again after a failure, in ms.
    pub reconnect_initial_backoff_ms: u64,
    /// Longest wait between two subscriptions of the settlement watcher, in ms.
    pub reconnect_max_backoff_ms: u64,
}

impl Default for LightningSection {
    fn default() -> Self {
        LightningSection {
            enabled: false,
            lnd_url: "https://127.0.0.1:8080".into(),
            macaroon_file: String::new(),
            macaroon_hex: None,
            tls_cert_file: String::new(),
            invoice_expiry_secs: 3600,
            request_timeout_ms: 10_000,
            reconnect_initial_backoff_ms: 500,
            reconnect_max_backoff_ms: 30_000,
        }
    }
}

impl LightningSection {
    /// Every problem of the section at once, as `lightning.<key>: <problem>` lines; empty when
    /// usable. Files are only required when `enabled`; their contents are checked at start.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push(format!("lightning.{key}: {problem}"));

        match reqwest::Url::parse(&self.lnd_url) {
            Ok(url) if url.scheme() != "https" => {
                bad("lnd_url", format!("must be https:// (LND's REST API is TLS only), got {}://", url.scheme()))
            }
            Ok(url) if url.host_str().is_none_or(str::is_empty) => bad("lnd_url", "has no host".into()),
            Ok(_) => {}
            Err(e) => bad("lnd_url", format!("not a URL ({e}): {:?}", self.lnd_url)),
        }
        match (&self.macaroon_hex, self.macaroon_file.is_empty()) {
            (Some(_), false) => bad("macaroon_hex", "set either macaroon_file or macaroon_hex, not both".into()),
            (None, true) if self.enabled => bad("macaroon_file", "required (or macaroon_hex)".into()),
            _ => {}
        }
        if let Some(h) = &self.macaroon_hex {
            if h.is_empty() {
                bad("macaroon_hex", "is empty".into());
            } else if let Err(e) = hex::decode(h.trim()) {
                bad("macaroon_hex", format!("not hex: {e}"));
            }
        }
        if self.enabled && self.tls_cert_file.is_empty() {
            bad("tls_cert_file", "required: LND's tls.cert".into());
        }
        if self.invoice_expiry_secs == 0 {
            bad("invoice_expiry_secs", "must be more than 0".into());
        }
        if self.request_timeout_ms == 0 {
            bad("request_timeout_ms", "must be more than 0".into());
        }
        if self.reconnect_initial_backoff_ms == 0 {
            bad("reconnect_initial_backoff_ms", "must be more than 0".into());
        }
        if self.reconnect_max_backoff_ms < self.reconnect_initial_backoff_ms {
            bad("reconnect_max_backoff_ms", "must be at least reconnect_initial_backoff_ms".into());
        }
        problems
    }

    /// `request_timeout_ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_section_is_valid_and_off() {
        let s = LightningSection::default();
        assert!(!s.enabled);
        assert_eq!(s.invoice_expiry_secs, 3600);
        assert_eq!(s.validate(), Vec::<String>::new());
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let s = LightningSection {
            enabled: true,
            lnd_url: "http://127.0.0.1:8080".into(),
            macaroon_file: String::new(),
            macaroon_hex: None,
            tls_cert_file: String::new(),
            invoice_expiry_secs: 0,
            request_timeout_ms: 0,
            reconnect_initial_backoff_ms: 0,
            reconnect_max_backoff_ms: 0,
        };
        let problems = s.validate();
        for key in [
            "lnd_url",
            "macaroon_file",
            "tls_cert_file",
            "invoice_expiry_secs",
            "request_timeout_ms",
            "reconnect_initial_backoff_ms",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("lightning.{key}:"))), "{key} in {problems:#?}");
        }
        assert_eq!(problems.len(), 6, "{problems:#?}");
    }

    #[test]
    fn macaroon_sources_are_exclusive_and_hex_is_checked() {
        let both = LightningSection {
            macaroon_file: "invoice.macaroon".into(),
            macaroon_hex: Some("0201".into()),
            ..Default::default()
        };
        assert!(both.validate().iter().any(|p| p.contains("not both")));
        let not_hex = LightningSection { macaroon_hex: Some("xyz".into()), ..Default::default() };
        assert!(not_hex.validate().iter().any(|p| p.starts_with("lightning.macaroon_hex: not hex")));
        let unparsable = LightningSection { lnd_url: "::".into(), ..Default::default() };
        assert!(unparsable.validate()[0].starts_with("lightning.lnd_url: not a URL"));
    }
}
