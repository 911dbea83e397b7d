//! Symmetric keys: base64 text outside, bytes inside, never printed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;

/// A shared access key (of a device, a module or a policy).
///
/// `Debug` is redacted so that keys never reach logs; equality is not derived, so comparisons go
/// through [`SymmetricKey::verify`], which is constant-time.
#[derive(Clone)]
pub struct SymmetricKey {
    bytes: Vec<u8>,
    text: String,
}

impl SymmetricKey {
    /// Parses a base64 key as IoT Hub accepts it: standard alphabet, 16 to 64 decoded bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(text)
            .map_err(|_| "The key is not valid base64".to_owned())?;
        if !(16..=64).contains(&bytes.len()) {
            return Err(format!(
                "The key must decode to between 16 and 64 bytes, not {}",
                bytes.len()
            ));
        }
        Ok(Self {
            bytes,
            text: text.to_owned(),
        })
    }

    /// A fresh random 32-byte key, as IoT Hub generates when a request leaves keys empty.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let text = STANDARD.encode(&bytes);
        Self { bytes, text }
    }

    /// The key as the base64 text clients put in connection strings.
    pub fn to_base64(&self) -> String {
        self.text.clone()
    }

    /// The key Service Bus and Event Hubs sign with: the UTF-8 bytes of the base64 text, not
    /// the decoded bytes (`shared/protocol-amqp.md`, trap 6).
    pub fn as_text_key(&self) -> Self {
        Self {
            bytes: self.text.as_bytes().to_vec(),
            text: self.text.clone(),
        }
    }

    /// HMAC-SHA256 of `message` under this key, base64-encoded.
    pub fn sign(&self, message: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.bytes).expect("HMAC accepts any key length");
        mac.update(message.as_bytes());
        STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Checks, in constant time, that `signature` (raw HMAC bytes) is this key's HMAC of `message`.
    pub fn verify(&self, message: &str, signature: &[u8]) -> bool {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.bytes).expect("HMAC accepts any key length");
        mac.update(message.as_bytes());
        mac.verify_slice(signature).is_ok()
    }
}

/// Keys are stored (with `--data-dir`) as their base64 text.
impl serde::Serialize for SymmetricKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for SymmetricKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = SymmetricKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()));
    }

    #[test]
    fn rejects_bad_base64_and_wrong_lengths() {
        assert!(SymmetricKey::parse("not base64!").is_err());
        assert!(SymmetricKey::parse("AAAA").is_err());
        assert!(SymmetricKey::parse(&STANDARD.encode([0u8; 65])).is_err());
        assert!(SymmetricKey::parse(&STANDARD.encode([0u8; 16])).is_ok());
    }

    #[test]
    fn sign_matches_rfc4231_test_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?". The key is
        // shorter than the 16 bytes IoT Hub requires, so build it directly.
        let key = SymmetricKey {
            bytes: b"Jefe".to_vec(),
            text: String::new(),
        };
        let sig = key.sign("what do ya want for nothing?");
        let hex: String = STANDARD
            .decode(sig)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
