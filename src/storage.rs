//! The blob store file uploads go to: an Azure Storage account (by default Azurite, Microsoft's
//! storage emulator), named by a storage connection string as IoT Hub's file-upload settings
//! name it.
//!
//! The hub needs three things from it: a container that exists, a service SAS a device can
//! upload one blob with, and that blob's size and time once the device says it is done. SAS
//! tokens are signed here with the account key by the documented rules (Microsoft's "Create a
//! service SAS" and "Create an account SAS", version 2020-12-06 string-to-sign): an HMAC-SHA256
//! over a few lines of text, which the crates that do it would bring a whole storage SDK for.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;
use std::time::{Duration, SystemTime};

/// The storage service version SAS tokens are signed for.
pub const SAS_VERSION: &str = "2020-12-06";

/// Azurite's well-known development account (Microsoft's Azurite documentation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The default connection string: Azurite's account on its default blob port, over HTTPS
/// (the device SDKs always upload over HTTPS, so Azurite runs with a certificate).
pub fn azurite_connection_string() -> String {
    format!(
        "DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
         BlobEndpoint=https://127.0.0.1:10000/{AZURITE_ACCOUNT}"
    )
}

/// Azure Storage's container name rules: 3 to 63 lower-case letters, digits and hyphens,
/// starting with a letter or digit, no two hyphens in a row, not ending with one.
pub fn valid_container_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// A storage account: its name, key and blob endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    key: Vec<u8>,
    /// The blob endpoint without a trailing `/`: `https://{name}.blob.core.windows.net`, or
    /// Azurite's path-style `https://127.0.0.1:10000/devstoreaccount1`.
    pub blob_endpoint: String,
}

impl Account {
    /// Parses a storage connection string (`AccountName`, `AccountKey`, and `BlobEndpoint` or
    /// `DefaultEndpointsProtocol` + `EndpointSuffix`; `UseDevelopmentStorage=true` is Azurite).
    ///
    /// # Errors
    /// Which part is missing or malformed.
    pub fn parse(connection_string: &str) -> Result<Self, String> {
        let mut fields = std::collections::HashMap::new();
        for part in connection_string
            .split(';')
            .filter(|p| !p.trim().is_empty())
        {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not Key=Value"))?;
            fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        if fields
            .get("usedevelopmentstorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Self::parse(&azurite_connection_string());
        }
        let name = fields
            .get("accountname")
            .filter(|n| !n.is_empty())
            .ok_or("AccountName is missing")?
            .clone();
        let key = BASE64
            .decode(fields.get("accountkey").ok_or("AccountKey is missing")?)
            .map_err(|_| "AccountKey is not base64".to_owned())?;
        if key.is_empty() {
            return Err("AccountKey is empty".to_owned());
        }
        let blob_endpoint = match fields.get("blobendpoint") {
            Some(endpoint) => endpoint.trim_end_matches('/').to_owned(),
            None => {
                let protocol = fields
                    .get("defaultendpointsprotocol")
                    .map_or("https", String::as_str);
                let suffix = fields
                    .get("endpointsuffix")
                    .map_or("core.windows.net", String::as_str);
                format!("{protocol}://{name}.blob.{suffix}")
            }
        };
        if !(blob_endpoint.starts_with("https://") || blob_endpoint.starts_with("http://")) {
            return Err(format!(
                "BlobEndpoint {blob_endpoint} is not an http(s) URL"
            ));
        }
        Ok(Self {
            name,
            key,
            blob_endpoint,
        })
    }

    /// The `hostName` a device is given: the blob endpoint without its scheme. The device SDKs
    /// upload to `https://{hostName}/{container}/{blobName}{sasToken}`.
    pub fn host_name(&self) -> &str {
        self.blob_endpoint
            .split_once("://")
            .map_or(self.blob_endpoint.as_str(), |(_, rest)| rest)
    }

    /// The URL of a container, or of a blob in it (the blob name's segments percent-encoded).
    pub fn url(&self, container: &str, blob: Option<&str>) -> String {
        let mut url = format!("{}/{}", self.blob_endpoint, container);
        if let Some(blob) = blob {
            for segment in blob.split('/') {
                url.push('/');
                url.extend(utf8_percent_encode(segment, PATH_SEGMENT));
            }
        }
        url
    }

    fn sign(&self, string_to_sign: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(string_to_sign.as_bytes());
        BASE64.encode(mac.finalize().into_bytes())
    }

    /// A service SAS (`?sv=…`) for one blob, with `permissions` (`r`, `c`, `w`, …) until
    /// `expiry`.
    pub fn blob_sas(
        &self,
        container: &str,
        blob: &str,
        permissions: &str,
        expiry: SystemTime,
    ) -> String {
        let expiry = sas_time(expiry);
        // permissions, start, expiry, resource, identifier, IP, protocol, version, signed
        // resource, snapshot time, encryption scope, then the five response headers.
        let string_to_sign = [
            permissions,
            "",
            &expiry,
            &format!("/blob/{}/{container}/{blob}", self.name),
            "",
            "",
            "",
            SAS_VERSION,
            "b",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
        .join("\n");
        format!(
            "?sv={SAS_VERSION}&sr=b&sig={}&se={}&sp={permissions}",
            query_encode(&self.sign(&string_to_sign)),
            query_encode(&expiry)
        )
    }

    /// An account SAS (`?sv=…`) for the blob service, for the hub's own calls: create the
    /// container, read a blob's properties.
    pub fn account_sas(&self, expiry: SystemTime) -> String {
        const PERMISSIONS: &str = "rwc";
        const RESOURCE_TYPES: &str = "sco";
        let expiry = sas_time(expiry);
        // account, permissions, services, resource types, start, expiry, IP, protocol,
        // version, encryption scope, and a final newline.
        let string_to_sign = [
            self.name.as_str(),
            PERMISSIONS,
            "b",
            RESOURCE_TYPES,
            "",
            &expiry,
            "",
            "",
            SAS_VERSION,
            "",
            "",
        ]
        .join("\n");
        format!(
            "?sv={SAS_VERSION}&ss=b&srt={RESOURCE_TYPES}&sp={PERMISSIONS}&se={}&sig={}",
            query_encode(&expiry),
            query_encode(&self.sign(&string_to_sign))
        )
    }
}

/// What a URL path segment keeps unencoded (RFC 3986 unreserved).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn query_encode(value: &str) -> String {
    utf8_percent_encode(value, PATH_SEGMENT).to_string()
}

/// A SAS time: ISO 8601 UTC to the second (`2026-12-07T16:00:00Z`).
fn sas_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A blob's properties, as the file upload notification reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobProperties {
    pub size: u64,
    /// `Last-Modified`, as an RFC 3339 time (`2026-12-07T16:00:00+00:00`).
    pub last_modified: String,
}

/// Why the store could not do what the hub asked.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the storage account at {endpoint} cannot be reached: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the storage account answered {status} to {what}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
}

/// How long one call to the store may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client for one storage account.
#[derive(Clone)]
pub struct BlobStore {
    pub account: Account,
    client: reqwest::Client,
}

impl BlobStore {
    /// A client that trusts the public roots and the PEM certificates in `extra_roots` (the
    /// emulator's CA, which Azurite's certificate is issued by).
    ///
    /// # Errors
    /// When the TLS client cannot be built from the certificates.
    pub fn new(account: Account, extra_roots: &[u8]) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CALL_TIMEOUT)
            .use_rustls_tls();
        for cert in reqwest::Certificate::from_pem_bundle(extra_roots)
            .map_err(|e| format!("the CA certificates for the blob store: {e}"))?
        {
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the blob store client: {e}"))?;
        Ok(Self { account, client })
    }

    fn unreachable(&self, e: &reqwest::Error) -> StorageError {
        StorageError::Unreachable {
            endpoint: self.account.blob_endpoint.clone(),
            reason: error_chain(e),
        }
    }

    fn own_sas(&self) -> String {
        self.account
            .account_sas(SystemTime::now() + Duration::from_secs(3600))
    }

    /// Creates `container` unless it exists.
    ///
    /// # Errors
    /// The store cannot be reached or refuses.
    pub async fn ensure_container(&self, container: &str) -> Result<(), StorageError> {
        let url = format!(
            "{}{}&restype=container",
            self.account.url(container, None),
            self.own_sas()
        );
        let response = self
            .client
            .put(url)
            .header("x-ms-version", SAS_VERSION)
            .header("content-length", "0")
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        // 409 ContainerAlreadyExists is what "it is there" looks like.
        if status == 201 || status == 409 {
            return Ok(());
        }
        Err(StorageError::Refused {
            what: format!("creating container {container}"),
            status,
            body: response.text().await.unwrap_or_default(),
        })
    }

    /// The size and last-modified time of a blob, or `None` if there is no such blob.
    ///
    /// # Errors
    /// The store cannot be reached or refuses.
    pub async fn blob_properties(
        &self,
        container: &str,
        blob: &str,
    ) -> Result<Option<BlobProperties>, StorageError> {
        let url = format!(
            "{}{}",
            self.account.url(container, Some(blob)),
            self.own_sas()
        );
        let response = self
            .client
            .head(url)
            .header("x-ms-version", SAS_VERSION)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if status != 200 {
            return Err(StorageError::Refused {
                what: format!("reading blob {blob}"),
                status,
                body: String::new(),
            });
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let size = header("content-length").parse().unwrap_or(0);
        let last_modified = time::OffsetDateTime::parse(
            &header("last-modified"),
            &time::format_description::well_known::Rfc2822,
        )
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]+00:00"
            ))
            .ok()
        })
        .unwrap_or_else(|| crate::timestamp::Timestamp::now().to_string());
        Ok(Some(BlobProperties {
            size,
            last_modified,
        }))
    }
}

/// An error and its sources, one line (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_the_account_and_its_endpoint() {
        let azurite = Account::parse("UseDevelopmentStorage=true").unwrap();
        assert_eq!(azurite.name, AZURITE_ACCOUNT);
        assert_eq!(azurite.host_name(), "127.0.0.1:10000/devstoreaccount1");
        let cloud = Account::parse(
            "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=AAAA;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert_eq!(cloud.blob_endpoint, "https://acme.blob.core.windows.net");
        assert_eq!(cloud.host_name(), "acme.blob.core.windows.net");
        assert_eq!(
            cloud.url("c", Some("dev 1/a#b.txt")),
            "https://acme.blob.core.windows.net/c/dev%201/a%23b.txt"
        );
        assert!(valid_container_name("fileuploads"));
        for bad in ["ab", "Uploads", "-a-b", "a--b", "ab-", "a_b"] {
            assert!(!valid_container_name(bad), "{bad}");
        }
        for bad in [
            "",
            "AccountName=a",
            "AccountName=a;AccountKey=!!",
            "AccountKey=AAAA",
            "AccountName=a;AccountKey=AAAA;BlobEndpoint=ftp://x",
            "nonsense",
        ] {
            assert!(Account::parse(bad).is_err(), "{bad}");
        }
    }

    /// The signature is the HMAC-SHA256, under the decoded account key, of the documented
    /// lines; checked here against an HMAC computed independently (ring).
    #[test]
    fn a_blob_sas_signs_the_documented_string() {
        let account = Account::parse(&azurite_connection_string()).unwrap();
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sas = account.blob_sas("uploads", "dev1/log.txt", "rcw", expiry);
        let expected_lines = "rcw\n\n2027-01-15T08:00:00Z\n/blob/devstoreaccount1/uploads/dev1/log.txt\n\n\n\n2020-12-06\nb\n\n\n\n\n\n\n";
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &BASE64.decode(AZURITE_KEY).unwrap(),
        );
        let sig = BASE64.encode(ring::hmac::sign(&key, expected_lines.as_bytes()).as_ref());
        assert_eq!(
            sas,
            format!(
                "?sv=2020-12-06&sr=b&sig={}&se=2027-01-15T08%3A00%3A00Z&sp=rcw",
                query_encode(&sig)
            )
        );
    }
}
