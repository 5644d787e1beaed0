//! Verifying inbound webhook deliveries on the raw body, before anything
//! parses it: the Standard Webhooks scheme Svix uses for Clerk and
//! Memberstack (`svix-*` or `webhook-*` headers) and Stripe's
//! `Stripe-Signature`. Also signs both schemes, for the fakes that stand in
//! for the providers. No I/O: the caller passes the headers, the body and
//! the clock.
//!
//! The secrets of senders are not usersync's to choose, so unlike
//! `core::signature` (which generates the secrets of the outbound sink and
//! insists on 24 bytes) a Standard Webhooks secret of any non-empty length is
//! accepted: Svix's own published example decodes to 18 bytes.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Both providers refuse deliveries older or newer than five minutes.
pub const TOLERANCE_SECS: i64 = 300;
/// Longest header value read (ids, timestamps, signature lists): a
/// rotation list of a few signatures fits many times over.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Longest delivery id accepted (it becomes part of a primary key).
pub const MAX_ID_BYTES: usize = 255;

const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Which signature scheme a sender uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Standard Webhooks / Svix: `v1,<base64>` over `id.timestamp.body`.
    Standard,
    /// Stripe: `t=<unix>,v1=<hex>` over `timestamp.body`.
    Stripe,
}

/// Why a secret was refused; never shows the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InboundSecretError {
    #[error("no secret given")]
    Empty,
    #[error(
        "a Standard Webhooks secret is \"whsec_\" followed by base64; this one is not valid base64"
    )]
    InvalidBase64,
    #[error("a Stripe webhook secret starts with \"whsec_\"")]
    StripePrefix,
}

/// The keys one source accepts (several during a rotation).
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    keys: Vec<HmacSha256>,
    tolerance: i64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Verifier({:?}, {} key(s), <redacted>)",
            self.scheme,
            self.keys.len()
        )
    }
}

/// Why a delivery was refused. The receiver answers 400 for a malformed
/// request and 401 for a signature or timestamp that does not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is malformed")]
    Malformed(&'static str),
    #[error("timestamp is {0} s away from now, more than the tolerance")]
    Stale(i64),
    #[error("no signature of a known version matches")]
    NoMatch,
}

impl Rejected {
    /// 400 for requests that are not deliveries at all, 401 for ones that
    /// fail authentication.
    pub fn status(&self) -> u16 {
        match self {
            Rejected::MissingHeader(_) | Rejected::Malformed(_) => 400,
            Rejected::Stale(_) | Rejected::NoMatch => 401,
        }
    }
}

/// What a verified delivery tells about itself before its body is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The delivery's message id (Standard Webhooks); Stripe's event id is
    /// in the body.
    pub message_id: Option<String>,
    pub timestamp: i64,
}

fn mac_key(bytes: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of every length (long ones are hashed first), so
    // this cannot fail; a match keeps it free of a panic path.
    match HmacSha256::new_from_slice(bytes) {
        Ok(k) => k,
        Err(_) => HmacSha256::new_from_slice(&[0u8; 32]).unwrap_or_else(|_| unreachable!()),
    }
}

/// The key bytes of a Standard Webhooks secret: the base64 after the
/// optional `whsec_` prefix (the reference libraries accept both).
pub fn standard_key(secret: &str) -> Result<Vec<u8>, InboundSecretError> {
    let s = secret.trim();
    let encoded = s.strip_prefix("whsec_").unwrap_or(s);
    let key = LENIENT_BASE64
        .decode(encoded)
        .map_err(|_| InboundSecretError::InvalidBase64)?;
    if key.is_empty() {
        return Err(InboundSecretError::Empty);
    }
    Ok(key)
}

impl Verifier {
    /// A verifier for `scheme` accepting any of `secrets`.
    pub fn new<S: AsRef<str>>(scheme: Scheme, secrets: &[S]) -> Result<Self, InboundSecretError> {
        if secrets.is_empty() {
            return Err(InboundSecretError::Empty);
        }
        let mut keys = Vec::with_capacity(secrets.len());
        for secret in secrets {
            let secret = secret.as_ref().trim();
            let bytes = match scheme {
                Scheme::Standard => standard_key(secret)?,
                Scheme::Stripe => {
                    if !secret.starts_with("whsec_") {
                        return Err(InboundSecretError::StripePrefix);
                    }
                    // Stripe keys the HMAC with the whole string, prefix
                    // included, not with decoded bytes.
                    secret.as_bytes().to_vec()
                }
            };
            keys.push(mac_key(&bytes));
        }
        Ok(Verifier {
            scheme,
            keys,
            tolerance: TOLERANCE_SECS,
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Checks one delivery. `header` looks a header up by its lower-case
    /// name; `now` is the receiver's clock in Unix seconds.
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, Rejected> {
        match self.scheme {
            Scheme::Standard => self.verify_standard(header, body, now),
            Scheme::Stripe => self.verify_stripe(header, body, now),
        }
    }

    fn check_time(&self, timestamp: i64, now: i64) -> Result<(), Rejected> {
        let skew = now.saturating_sub(timestamp);
        if skew.saturating_abs() > self.tolerance {
            return Err(Rejected::Stale(skew));
        }
        Ok(())
    }

    fn verify_standard<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, Rejected> {
        // Svix sends svix-*, other Standard Webhooks senders webhook-*; a
        // sender uses one family for all three.
        let (id_name, ts_name, sig_name) = if header("svix-id").is_some() {
            ("svix-id", "svix-timestamp", "svix-signature")
        } else {
            ("webhook-id", "webhook-timestamp", "webhook-signature")
        };
        let id = bounded(&header, id_name, MAX_ID_BYTES)?;
        let ts_text = bounded(&header, ts_name, 32)?;
        let signatures = bounded(&header, sig_name, MAX_HEADER_BYTES)?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Rejected::Malformed(id_name));
        }
        let timestamp: i64 = ts_text
            .trim()
            .parse()
            .map_err(|_| Rejected::Malformed(ts_name))?;
        self.check_time(timestamp, now)?;
        let mut matched = false;
        for entry in signatures.split_ascii_whitespace() {
            let Some((version, encoded)) = entry.split_once(',') else {
                continue;
            };
            if version != "v1" {
                continue;
            }
            let Ok(candidate) = LENIENT_BASE64.decode(encoded) else {
                continue;
            };
            for key in &self.keys {
                let mut mac = key.clone();
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                // Constant-time comparison.
                if mac.verify_slice(&candidate).is_ok() {
                    matched = true;
                }
            }
        }
        if !matched {
            return Err(Rejected::NoMatch);
        }
        Ok(Verified {
            message_id: Some(id.to_string()),
            timestamp,
        })
    }

    fn verify_stripe<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, Rejected> {
        const NAME: &str = "stripe-signature";
        let value = bounded(&header, NAME, MAX_HEADER_BYTES)?;
        let mut timestamp = None;
        let mut candidates = Vec::new();
        for item in value.split(',') {
            let Some((k, v)) = item.trim().split_once('=') else {
                continue;
            };
            match k {
                "t" => timestamp = Some(v.parse::<i64>().map_err(|_| Rejected::Malformed(NAME))?),
                "v1" => {
                    if let Some(bytes) = decode_hex(v) {
                        candidates.push(bytes);
                    }
                }
                // v0 (test mode's old scheme) and unknown schemes are skipped.
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(Rejected::Malformed(NAME))?;
        if candidates.is_empty() {
            return Err(Rejected::NoMatch);
        }
        self.check_time(timestamp, now)?;
        let mut matched = false;
        for key in &self.keys {
            for candidate in &candidates {
                let mut mac = key.clone();
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                if mac.verify_slice(candidate).is_ok() {
                    matched = true;
                }
            }
        }
        if !matched {
            return Err(Rejected::NoMatch);
        }
        Ok(Verified {
            message_id: None,
            timestamp,
        })
    }
}

fn bounded<'h>(
    header: &impl Fn(&str) -> Option<&'h str>,
    name: &'static str,
    max: usize,
) -> Result<&'h str, Rejected> {
    let v = header(name).ok_or(Rejected::MissingHeader(name))?;
    if v.len() > max {
        return Err(Rejected::Malformed(name));
    }
    Ok(v)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The `svix-signature` / `webhook-signature` value a Standard Webhooks
/// sender would send (for the fakes).
pub fn sign_standard(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac_key(key);
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `Stripe-Signature` value Stripe would send (for the fakes).
pub fn sign_stripe(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac_key(secret.as_bytes());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    // Svix's published example (docs.svix.com, "Verifying payloads
    // manually"): its secret decodes to 18 bytes.
    const SVIX_SECRET: &str = "whsec_plJ3nmyCDGBKInavdOK15jsl";
    const SVIX_ID: &str = "msg_loFOjxBNrRLzqYUf";
    const SVIX_TS: i64 = 1_731_705_121;
    const SVIX_BODY: &[u8] = br#"{"event_type":"ping","data":{"success":true}}"#;
    const SVIX_SIG: &str = "v1,rAvfW3dJ/X/qxhsaXPOyyCGmRKsaKWcsNccKXlIktD0=";

    // A Stripe vector, computed independently with
    // `openssl dgst -sha256 -hmac <whole secret>` over "t.body".
    const STRIPE_SECRET: &str = "whsec_test_secret_for_usersync";
    const STRIPE_TS: i64 = 1_700_000_000;
    const STRIPE_BODY: &[u8] = br#"{"id":"evt_test_1","object":"event","type":"customer.updated"}"#;
    const STRIPE_HEX: &str = "cdb13e49575f71785f0c928b416731ff6dd09a6b2d3c90056f039efcb398bf45";

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(
        v: &Verifier,
        h: &HashMap<String, String>,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, Rejected> {
        v.verify(|n| h.get(n).map(String::as_str), body, now)
    }

    fn svix_headers(sig: &str) -> HashMap<String, String> {
        headers(&[
            ("svix-id", SVIX_ID),
            ("svix-timestamp", &SVIX_TS.to_string()),
            ("svix-signature", sig),
        ])
    }

    fn svix() -> Verifier {
        Verifier::new(Scheme::Standard, &[SVIX_SECRET]).expect("svix secret")
    }

    fn stripe() -> Verifier {
        Verifier::new(Scheme::Stripe, &[STRIPE_SECRET]).expect("stripe secret")
    }

    #[test]
    fn svix_published_vector_verifies_with_its_18_byte_secret() {
        assert_eq!(standard_key(SVIX_SECRET).map(|k| k.len()), Ok(18));
        let got = check(&svix(), &svix_headers(SVIX_SIG), SVIX_BODY, SVIX_TS);
        assert_eq!(
            got,
            Ok(Verified {
                message_id: Some(SVIX_ID.into()),
                timestamp: SVIX_TS
            })
        );
        let key = standard_key(SVIX_SECRET).expect("key");
        assert_eq!(sign_standard(&key, SVIX_ID, SVIX_TS, SVIX_BODY), SVIX_SIG);
    }

    #[test]
    fn webhook_prefixed_headers_verify_too() {
        let h = headers(&[
            ("webhook-id", SVIX_ID),
            ("webhook-timestamp", &SVIX_TS.to_string()),
            ("webhook-signature", SVIX_SIG),
        ]);
        assert!(check(&svix(), &h, SVIX_BODY, SVIX_TS).is_ok());
    }

    #[test]
    fn standard_refusals() {
        let v = svix();
        let h = svix_headers(SVIX_SIG);
        assert_eq!(
            check(
                &v,
                &h,
                br#"{"event_type":"ping","data":{"success":false}}"#,
                SVIX_TS
            ),
            Err(Rejected::NoMatch),
            "tampered body"
        );
        let other = Verifier::new(
            Scheme::Standard,
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        )
        .expect("other");
        assert_eq!(
            check(&other, &h, SVIX_BODY, SVIX_TS),
            Err(Rejected::NoMatch),
            "wrong secret"
        );
        for missing in ["svix-id", "svix-timestamp", "svix-signature"] {
            let mut h = h.clone();
            h.remove(missing);
            let got = check(&v, &h, SVIX_BODY, SVIX_TS);
            assert!(
                matches!(got, Err(Rejected::MissingHeader(_))),
                "{missing}: {got:?}"
            );
            assert_eq!(got.map_err(|e| e.status()), Err(400));
        }
        assert_eq!(check(&v, &h, SVIX_BODY, SVIX_TS + 300).map(|_| ()), Ok(()));
        assert_eq!(check(&v, &h, SVIX_BODY, SVIX_TS - 300).map(|_| ()), Ok(()));
        assert_eq!(
            check(&v, &h, SVIX_BODY, SVIX_TS + 301),
            Err(Rejected::Stale(301))
        );
        assert_eq!(
            check(&v, &h, SVIX_BODY, SVIX_TS - 301),
            Err(Rejected::Stale(-301))
        );
        assert_eq!(Rejected::Stale(301).status(), 401);
        let only_v1a = svix_headers(&SVIX_SIG.replacen("v1,", "v1a,", 1));
        assert_eq!(
            check(&v, &only_v1a, SVIX_BODY, SVIX_TS),
            Err(Rejected::NoMatch)
        );
        let garbage = svix_headers("v1,@@@ v1 ,,, v2,abc");
        assert_eq!(
            check(&v, &garbage, SVIX_BODY, SVIX_TS),
            Err(Rejected::NoMatch)
        );
        let mut bad_ts = h.clone();
        bad_ts.insert("svix-timestamp".into(), "soon".into());
        assert_eq!(
            check(&v, &bad_ts, SVIX_BODY, SVIX_TS),
            Err(Rejected::Malformed("svix-timestamp"))
        );
    }

    #[test]
    fn rotation_accepts_any_listed_secret_and_any_listed_signature() {
        let v = Verifier::new(
            Scheme::Standard,
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SVIX_SECRET],
        )
        .expect("two secrets");
        let wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        let h = svix_headers(&format!("v1a,xyz {wrong} {SVIX_SIG}"));
        assert!(check(&v, &h, SVIX_BODY, SVIX_TS).is_ok());
        let h = svix_headers(wrong);
        assert_eq!(check(&v, &h, SVIX_BODY, SVIX_TS), Err(Rejected::NoMatch));
    }

    #[test]
    fn stripe_vector_verifies_and_refusals() {
        let v = stripe();
        let good = format!("t={STRIPE_TS},v1={STRIPE_HEX}");
        assert_eq!(sign_stripe(STRIPE_SECRET, STRIPE_TS, STRIPE_BODY), good);
        let h = headers(&[("stripe-signature", &good)]);
        assert_eq!(
            check(&v, &h, STRIPE_BODY, STRIPE_TS),
            Ok(Verified {
                message_id: None,
                timestamp: STRIPE_TS
            })
        );
        // Several v1 entries (rotation) and an unknown v0.
        let multi = format!("t={STRIPE_TS},v0=abc,v1={},v1={STRIPE_HEX}", "0".repeat(64));
        assert!(check(
            &v,
            &headers(&[("stripe-signature", &multi)]),
            STRIPE_BODY,
            STRIPE_TS
        )
        .is_ok());
        assert_eq!(
            check(&v, &h, br#"{"id":"evt_test_2"}"#, STRIPE_TS),
            Err(Rejected::NoMatch)
        );
        let other = Verifier::new(Scheme::Stripe, &["whsec_other"]).expect("other");
        assert_eq!(
            check(&other, &h, STRIPE_BODY, STRIPE_TS),
            Err(Rejected::NoMatch)
        );
        assert_eq!(
            check(&v, &headers(&[]), STRIPE_BODY, STRIPE_TS),
            Err(Rejected::MissingHeader("stripe-signature"))
        );
        assert!(check(&v, &h, STRIPE_BODY, STRIPE_TS + 300).is_ok());
        assert_eq!(
            check(&v, &h, STRIPE_BODY, STRIPE_TS + 301),
            Err(Rejected::Stale(301))
        );
        assert_eq!(
            check(&v, &h, STRIPE_BODY, STRIPE_TS - 301),
            Err(Rejected::Stale(-301))
        );
        let only_v0 = format!("t={STRIPE_TS},v0={STRIPE_HEX}");
        assert_eq!(
            check(
                &v,
                &headers(&[("stripe-signature", &only_v0)]),
                STRIPE_BODY,
                STRIPE_TS
            ),
            Err(Rejected::NoMatch)
        );
        // The key is the whole string: base64-decoding it must not verify.
        let decoded = Verifier::new(Scheme::Standard, &[STRIPE_SECRET]);
        if let Ok(d) = decoded {
            let h2 = headers(&[
                ("webhook-id", "x"),
                ("webhook-timestamp", &STRIPE_TS.to_string()),
                ("webhook-signature", &good),
            ]);
            assert!(check(&d, &h2, STRIPE_BODY, STRIPE_TS).is_err());
        }
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert_eq!(
            Verifier::new::<&str>(Scheme::Standard, &[]).map(|_| ()),
            Err(InboundSecretError::Empty)
        );
        assert_eq!(
            Verifier::new(Scheme::Standard, &["whsec_"]).map(|_| ()),
            Err(InboundSecretError::Empty)
        );
        assert_eq!(
            Verifier::new(Scheme::Standard, &["whsec_*not*"]).map(|_| ()),
            Err(InboundSecretError::InvalidBase64)
        );
        assert_eq!(
            Verifier::new(Scheme::Stripe, &["sk_live_x"]).map(|_| ()),
            Err(InboundSecretError::StripePrefix)
        );
        // One byte is enough.
        assert!(Verifier::new(Scheme::Standard, &["whsec_AQ=="]).is_ok());
        let shown = format!("{:?}", svix());
        assert!(!shown.contains("plJ3"), "{shown}");
    }
}
