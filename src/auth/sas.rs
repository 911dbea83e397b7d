//! SAS tokens: `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` (`shared/protocol.md` B).
//!
//! The signature is HMAC-SHA256 over the `sr` value *exactly as written in the token* (already
//! URL-encoded), a newline and the expiry. No SDK lower-cases or re-encodes anything, so the
//! emulator verifies against the raw text and only then decodes `sr` to learn which host and
//! resource the token is for.

use super::SymmetricKey;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use percent_encoding::percent_decode_str;

/// Why a token was refused. Messages are for the caller; none contains a key or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("The token is not of the form 'SharedAccessSignature sr=...&sig=...&se=...'")]
    Malformed,
    #[error("The token has no '{0}' field")]
    Missing(&'static str),
    #[error("The token's '{0}' field is invalid")]
    Invalid(&'static str),
    #[error("The token expired at {0} (unix seconds)")]
    Expired(u64),
    #[error("The token is for host '{0}', which this hub does not answer to")]
    WrongHost(String),
    #[error("The token's resource does not cover this operation")]
    OutOfScope,
    #[error("The token's signature does not match any key for it")]
    BadSignature,
    #[error("The token names policy '{0}', which does not exist")]
    UnknownPolicy(String),
}

/// A parsed SAS token. `sr` keeps the raw, still-encoded text because that is what was signed.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    sr_raw: String,
    signature: Vec<u8>,
    expiry: u64,
    policy: Option<String>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("sr", &self.sr_raw)
            .field("se", &self.expiry)
            .field("skn", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The decoded `sr`: a host (lower-case, without port) and the path segments under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub host: String,
    pub segments: Vec<String>,
}

impl SasToken {
    /// Parses a token. Fields may come in any order (each SDK has its own); unknown fields are
    /// ignored; every value is percent-decoded except `sr`, which is kept as written.
    pub fn parse(text: &str) -> Result<Self, SasError> {
        let rest = text
            .trim()
            .strip_prefix("SharedAccessSignature")
            .ok_or(SasError::Malformed)?;
        // Node's parser splits on any whitespace; accept one or more blanks.
        if !rest.starts_with(char::is_whitespace) {
            return Err(SasError::Malformed);
        }
        let rest = rest.trim_start();
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.split('&') {
            let (name, value) = field.split_once('=').ok_or(SasError::Malformed)?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::Malformed);
            }
        }
        let sr_raw = sr.ok_or(SasError::Missing("sr"))?;
        if sr_raw.is_empty() {
            return Err(SasError::Invalid("sr"));
        }
        let sig = decode(sig.ok_or(SasError::Missing("sig"))?).ok_or(SasError::Invalid("sig"))?;
        let signature = STANDARD
            .decode(sig.trim())
            .map_err(|_| SasError::Invalid("sig"))?;
        let expiry = decode(se.ok_or(SasError::Missing("se"))?)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(SasError::Invalid("se"))?;
        let policy = match skn {
            Some(v) => Some(decode(v).ok_or(SasError::Invalid("skn"))?),
            None => None,
        }
        .filter(|s| !s.is_empty());
        Ok(Self {
            sr_raw: sr_raw.to_owned(),
            signature,
            expiry,
            policy,
        })
    }

    /// The policy named by `skn`, if any.
    pub fn policy(&self) -> Option<&str> {
        self.policy.as_deref()
    }

    /// Expiry, in unix seconds.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// The exact text whose HMAC the token carries. Safe to log: it contains no secret.
    pub fn string_to_sign(&self) -> String {
        format!("{}\n{}", self.sr_raw, self.expiry)
    }

    /// Whether `sr` is a Service Bus URI (`sb://…`, as the Event Hubs SDKs write it for the
    /// Event Hub-compatible endpoint), whose tokens are signed with the key's base64 text.
    pub fn is_service_bus_style(&self) -> bool {
        let sr = self.sr_raw.to_ascii_lowercase();
        sr.starts_with("sb://") || sr.starts_with("sb%3a%2f%2f")
    }

    /// Whether `key` produced this token's signature (constant-time).
    pub fn is_signed_by(&self, key: &SymmetricKey) -> bool {
        key.verify(&self.string_to_sign(), &self.signature)
    }

    /// Fails if the token has expired at `now` (unix seconds).
    pub fn check_expiry(&self, now: u64) -> Result<(), SasError> {
        if self.expiry <= now {
            return Err(SasError::Expired(self.expiry));
        }
        Ok(())
    }

    /// Decodes `sr` into host and path segments. `+` means a space here, as C#'s
    /// `WebUtility.UrlEncode` writes it; hex escapes are case-insensitive.
    pub fn resource(&self) -> Result<Resource, SasError> {
        let plus_as_space = self.sr_raw.replace('+', " ");
        let decoded = decode(&plus_as_space).ok_or(SasError::Invalid("sr"))?;
        let decoded = decoded
            .strip_prefix("https://")
            .or_else(|| decoded.strip_prefix("amqps://"))
            .or_else(|| decoded.strip_prefix("sb://"))
            .unwrap_or(&decoded);
        let (host, path) = decoded.split_once('/').unwrap_or((decoded, ""));
        let host = strip_port(host).to_ascii_lowercase();
        if host.is_empty() {
            return Err(SasError::Invalid("sr"));
        }
        let segments = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Resource { host, segments })
    }
}

impl Resource {
    /// Segment-prefix match (DOC-SAS: `/a/b` covers `/a/b/c` but not `/a/bc`).
    pub fn covers(&self, target: &[&str]) -> bool {
        self.segments.len() <= target.len() && self.segments.iter().zip(target).all(|(a, b)| a == b)
    }
}

/// Removes a `:port` suffix from a host name, leaving bracketed IPv6 literals intact.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The characters JavaScript's `encodeURIComponent` leaves alone: what the SDKs and IoT Hub
/// use for SAS fields and MQTT property bags (`$` becomes `%24`).
pub const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Builds a token the way the SDKs do (used by tests and by the start-up banner's examples).
pub fn make_token(resource: &str, key: &SymmetricKey, policy: Option<&str>, expiry: u64) -> String {
    use percent_encoding::utf8_percent_encode;
    let sr = utf8_percent_encode(resource, URI_COMPONENT).to_string();
    let sig = key.sign(&format!("{sr}\n{expiry}"));
    let sig = utf8_percent_encode(&sig, URI_COMPONENT);
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(p) = policy {
        token.push_str("&skn=");
        token.push_str(p);
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SymmetricKey {
        SymmetricKey::parse(crate::auth::OWNER_KEY).unwrap()
    }

    /// A token computed outside this code (Python `hmac`/`hashlib`, the recipe of DOC-SAS's
    /// sample `generate_sas_token`) for `myhub.azure-devices.net/devices/dev1`, se=1700000000.
    const PY_DOC_SAMPLE: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig=PY_SIG&se=1700000000";

    #[test]
    fn verifies_signature_over_raw_sr() {
        let token = make_token(
            "myhub.azure-devices.net/devices/dev1",
            &key(),
            None,
            1_700_000_000,
        );
        let parsed = SasToken::parse(&token).unwrap();
        assert!(parsed.is_signed_by(&key()));
        assert_eq!(
            parsed.string_to_sign(),
            "myhub.azure-devices.net%2Fdevices%2Fdev1\n1700000000"
        );
        assert!(!parsed.is_signed_by(&SymmetricKey::generate()));
    }

    #[test]
    fn verifies_an_independently_computed_token() {
        let token = PY_DOC_SAMPLE.replace("PY_SIG", PY_SIG);
        assert!(SasToken::parse(&token).unwrap().is_signed_by(&key()));
    }

    /// `base64(hmac_sha256(b64decode(OWNER_KEY), "myhub.azure-devices.net%2Fdevices%2Fdev1\n1700000000"))`,
    /// URL-encoded with `quote(safe='')`, computed with Python 3.11's standard library.
    const PY_SIG: &str = "WM8KGGTCny5mcpSxbva5hzPhhSZ0pMAC6IxCK6xfuEA%3D";

    #[test]
    fn fields_in_any_order_and_skn() {
        let a = "SharedAccessSignature sr=h&sig=AAAA&skn=iothubowner&se=5";
        let b = "SharedAccessSignature  se=5&skn=iothubowner&sr=h&sig=AAAA";
        let (a, b) = (SasToken::parse(a).unwrap(), SasToken::parse(b).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.policy(), Some("iothubowner"));
        assert_eq!(a.expiry(), 5);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "Bearer x",
            "SharedAccessSignaturesr=h&sig=AAAA&se=5",
            "SharedAccessSignature sr=h&sig=AAAA",
            "SharedAccessSignature sig=AAAA&se=5",
            "SharedAccessSignature sr=h&sig=@@@&se=5",
            "SharedAccessSignature sr=h&sig=AAAA&se=soon",
            "SharedAccessSignature sr=h&sig=AAAA&se=5&se=6",
            "SharedAccessSignature sr=h&sig",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn python_hub_sig_with_literal_slash_is_accepted() {
        // PY-HUB encodes sig with quote(sig), leaving '/' literal.
        let t = SasToken::parse("SharedAccessSignature sr=h&sig=ab/c%2BdwA&se=5").unwrap();
        assert_eq!(STANDARD.encode(&t.signature), "ab/c+dwA");
    }

    #[test]
    fn resource_decodes_host_port_and_segments() {
        let t = SasToken::parse("SharedAccessSignature sr=127.0.0.2%3A8443&sig=AAAA&se=5").unwrap();
        assert_eq!(t.resource().unwrap().host, "127.0.0.2");
        let t = SasToken::parse(
            "SharedAccessSignature sr=MyHub.azure-devices.net%2fdevices%2fdev+1%2Fmodules%2Fm&sig=AAAA&se=5",
        )
        .unwrap();
        let r = t.resource().unwrap();
        assert_eq!(r.host, "myhub.azure-devices.net");
        assert_eq!(r.segments, ["devices", "dev 1", "modules", "m"]);
    }

    #[test]
    fn scope_is_a_segment_prefix() {
        let r = Resource {
            host: "h".into(),
            segments: vec!["devices".into(), "a".into()],
        };
        assert!(r.covers(&["devices", "a"]));
        assert!(r.covers(&["devices", "a", "modules", "m"]));
        assert!(!r.covers(&["devices", "ab"]));
        assert!(!r.covers(&["devices"]));
        let host_only = Resource {
            host: "h".into(),
            segments: vec![],
        };
        assert!(host_only.covers(&["devices", "x"]));
    }

    #[test]
    fn expiry_is_checked() {
        let t = SasToken::parse("SharedAccessSignature sr=h&sig=AAAA&se=100").unwrap();
        assert!(t.check_expiry(99).is_ok());
        assert_eq!(t.check_expiry(100), Err(SasError::Expired(100)));
    }

    #[test]
    fn strip_port_handles_names_ipv4_and_ipv6() {
        assert_eq!(strip_port("localhost:443"), "localhost");
        assert_eq!(strip_port("127.0.0.2"), "127.0.0.2");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }
}
