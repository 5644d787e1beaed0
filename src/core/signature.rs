//! Standard Webhooks symmetric signatures (`v1`, HMAC-SHA256): parsing and
//! generating `whsec_` secrets, signing outgoing deliveries and verifying
//! `webhook-signature` headers. The sink signs with it and the fake service
//! verifies with it, so both ends share one implementation of the scheme.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix that marks a serialized symmetric secret in the spec, so a key can't
/// be confused with an asymmetric `whsk_`/`whpk_` one.
const SECRET_PREFIX: &str = "whsec_";
/// Version tag of HMAC-SHA256 signatures in the signature header.
const SIGNATURE_VERSION: &str = "v1";
/// The spec asks for at least 192 bits of key.
pub const MIN_SECRET_BYTES: usize = 24;
/// The spec caps keys at 512 bits.
pub const MAX_SECRET_BYTES: usize = 64;
/// Length of the key that [`WebhookSecret::generate`] makes.
const GENERATED_SECRET_BYTES: usize = 32;

/// Secrets are pasted by people and written by other tools: some strip the
/// `=` padding, so decoding accepts it either way.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A shared HMAC key. Cloning is cheap enough for per-delivery use; the keyed
/// HMAC state is prepared once at parse time.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
    keyed: HmacSha256,
}

impl fmt::Debug for WebhookSecret {
    // The secret ends up in config structs that get logged with `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Why a secret string was refused. Messages describe the shape of the
/// problem only: the secret itself must never reach a log.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("webhook secret must start with \"whsec_\"")]
    MissingPrefix,
    #[error("webhook secret is not valid base64 after the \"whsec_\" prefix")]
    InvalidBase64,
    #[error("webhook secret decodes to {len} bytes; at least {MIN_SECRET_BYTES} are required")]
    TooShort { len: usize },
    #[error("webhook secret decodes to {len} bytes; at most {MAX_SECRET_BYTES} are allowed")]
    TooLong { len: usize },
    #[error("webhook secret cannot be used as an HMAC-SHA256 key")]
    InvalidKey,
}

impl WebhookSecret {
    /// Parses `whsec_<base64>`. Surrounding whitespace is ignored because
    /// secrets are usually read from files that end with a newline.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let encoded = s
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = LENIENT_BASE64
            .decode(encoded)
            .map_err(|_| SecretError::InvalidBase64)?;
        Self::from_key(key)
    }

    /// A fresh random 32-byte secret (for the demo and tests).
    pub fn generate() -> Self {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        rand::rng().fill_bytes(&mut key);
        // HMAC takes keys of any length and 32 is within the spec's bounds,
        // so this key, made here and never read from outside, is always valid.
        Self::from_key(key).expect("a 32-byte random key is a valid webhook secret")
    }

    fn from_key(key: Vec<u8>) -> Result<Self, SecretError> {
        if key.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort { len: key.len() });
        }
        if key.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLong { len: key.len() });
        }
        let keyed = HmacSha256::new_from_slice(&key).map_err(|_| SecretError::InvalidKey)?;
        Ok(Self { key, keyed })
    }

    /// The serialized form, accepted back by [`WebhookSecret::parse`].
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// The `webhook-signature` value for one delivery attempt:
    /// `v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac_over(msg_id, timestamp, body)
            .finalize()
            .into_bytes();
        format!("{SIGNATURE_VERSION},{}", STANDARD.encode(tag))
    }

    /// True when any `v1` entry of the space-separated header matches.
    /// Several entries exist during key rotation; entries of other versions
    /// (e.g. asymmetric `v1a`) and undecodable ones are skipped rather than
    /// failing the whole header, as the spec expects for forward
    /// compatibility. The timestamp is not checked against the clock here:
    /// replay tolerance is the receiver's policy.
    pub fn verify(
        &self,
        msg_id: &str,
        timestamp: i64,
        body: &[u8],
        signature_header: &str,
    ) -> bool {
        let mut matched = false;
        for entry in signature_header.split_ascii_whitespace() {
            let Some((version, encoded)) = entry.split_once(',') else {
                continue;
            };
            if version != SIGNATURE_VERSION {
                continue;
            }
            let Ok(candidate) = LENIENT_BASE64.decode(encoded) else {
                continue;
            };
            // verify_slice compares in constant time, so a forged header
            // can't learn the expected tag byte by byte.
            if self
                .mac_over(msg_id, timestamp, body)
                .verify_slice(&candidate)
                .is_ok()
            {
                matched = true;
            }
        }
        matched
    }

    fn mac_over(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vector published with the Standard Webhooks reference libraries.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_secret() -> WebhookSecret {
        match WebhookSecret::parse(VECTOR_SECRET) {
            Ok(s) => s,
            Err(e) => panic!("test vector secret rejected: {e}"),
        }
    }

    #[test]
    fn signs_the_reference_test_vector() {
        let secret = vector_secret();
        assert_eq!(
            secret.sign(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        assert!(secret.verify(
            VECTOR_MSG_ID,
            VECTOR_TIMESTAMP,
            VECTOR_BODY,
            VECTOR_SIGNATURE
        ));
    }

    #[test]
    fn generated_secret_round_trips() {
        let secret = WebhookSecret::generate();
        let serialized = secret.to_whsec();
        assert!(serialized.starts_with("whsec_"));
        let reparsed = WebhookSecret::parse(&serialized).expect("own serialization parses");
        assert_eq!(reparsed.key.len(), GENERATED_SECRET_BYTES);
        assert_eq!(reparsed.to_whsec(), serialized);

        let sig = secret.sign("msg_1", 1_700_000_000, b"{}");
        assert!(reparsed.verify("msg_1", 1_700_000_000, b"{}", &sig));
        assert_ne!(
            WebhookSecret::generate().to_whsec(),
            serialized,
            "generate must not repeat keys"
        );
    }

    #[test]
    fn any_changed_input_fails_verification() {
        let secret = vector_secret();
        let sig = VECTOR_SIGNATURE;
        let other = WebhookSecret::generate();
        assert!(!other.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY, sig));
        assert!(!secret.verify(
            VECTOR_MSG_ID,
            VECTOR_TIMESTAMP,
            br#"{"test": 2432232315}"#,
            sig
        ));
        assert!(!secret.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJeK",
            VECTOR_TIMESTAMP,
            VECTOR_BODY,
            sig
        ));
        assert!(!secret.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP + 1, VECTOR_BODY, sig));
        // A truncated tag must not verify as a prefix match.
        assert!(!secret.verify(
            VECTOR_MSG_ID,
            VECTOR_TIMESTAMP,
            VECTOR_BODY,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ"
        ));
    }

    #[test]
    fn malformed_headers_fail_without_panicking() {
        let secret = vector_secret();
        for header in [
            "",
            "   ",
            "v1",
            "v1,",
            "v1,not base64!!",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ",g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1;g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert!(
                !secret.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY, header),
                "{header:?} must not verify"
            );
        }
    }

    #[test]
    fn multi_signature_header_matches_any_v1_entry() {
        let secret = vector_secret();
        let stale = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        let header = format!("{stale} v1a,hnO3f9T8Ytu9HwrXslvumlUp {VECTOR_SIGNATURE} {stale}");
        assert!(secret.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY, &header));

        // Rotation: the header signed with an old and a new key verifies
        // against either one.
        let old = WebhookSecret::generate();
        let rotated = format!("{}  {}", old.sign("m", 1, b"x"), secret.sign("m", 1, b"x"));
        assert!(old.verify("m", 1, b"x", &rotated));
        assert!(secret.verify("m", 1, b"x", &rotated));

        // A correct tag under another version label is not a v1 signature.
        let relabeled = VECTOR_SIGNATURE.replacen("v1,", "v2,", 1);
        assert!(!secret.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY, &relabeled));
        let only_stale = format!("{stale} {stale}");
        assert!(!secret.verify(VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY, &only_stale));
    }

    #[test]
    fn parse_trims_and_accepts_unpadded_base64() {
        let from_file = format!("  {VECTOR_SECRET}\n");
        let secret = WebhookSecret::parse(&from_file).expect("trimmed secret parses");
        assert_eq!(secret.to_whsec(), VECTOR_SECRET);

        let padded = WebhookSecret::generate().to_whsec();
        assert!(padded.ends_with('='), "32 bytes encode with padding");
        let unpadded = padded.trim_end_matches('=');
        let parsed = WebhookSecret::parse(unpadded).expect("unpadded secret parses");
        assert_eq!(parsed.to_whsec(), padded);
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::MissingPrefix)
        ));
        assert!(matches!(
            WebhookSecret::parse("whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::MissingPrefix)
        ));
        assert!(matches!(
            WebhookSecret::parse("whsec_MfKQ9r8G*YqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::InvalidBase64)
        ));
        assert!(matches!(
            WebhookSecret::parse(""),
            Err(SecretError::MissingPrefix)
        ));
        assert!(matches!(
            WebhookSecret::parse("whsec_"),
            Err(SecretError::TooShort { len: 0 })
        ));
        let short = format!("whsec_{}", STANDARD.encode([7u8; MIN_SECRET_BYTES - 1]));
        assert!(matches!(
            WebhookSecret::parse(&short),
            Err(SecretError::TooShort { len: 23 })
        ));
        let long = format!("whsec_{}", STANDARD.encode([7u8; MAX_SECRET_BYTES + 1]));
        assert!(matches!(
            WebhookSecret::parse(&long),
            Err(SecretError::TooLong { len: 65 })
        ));
        let min = format!("whsec_{}", STANDARD.encode([7u8; MIN_SECRET_BYTES]));
        assert!(WebhookSecret::parse(&min).is_ok());
        let max = format!("whsec_{}", STANDARD.encode([7u8; MAX_SECRET_BYTES]));
        assert!(WebhookSecret::parse(&max).is_ok());
    }

    #[test]
    fn secret_never_appears_in_debug_or_errors() {
        let secret = vector_secret();
        let key_b64 = VECTOR_SECRET.trim_start_matches("whsec_");
        let debug = format!("{secret:?}");
        assert_eq!(debug, "WebhookSecret(<redacted>)");
        assert!(!debug.contains(key_b64));

        let bad = "whsec_MfKQ9r8G*YqrTwjUPD8ILPZIo2LaLaSw";
        let short = "whsec_MfKQ9r8GKYqr";
        for input in [bad, short, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            let err = WebhookSecret::parse(input).expect_err("invalid secret");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("MfKQ9r8G"), "{shown}");
        }
    }
}
