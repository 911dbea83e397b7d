//! TLS for every listener: a local CA kept in the certs directory, a server certificate made
//! fresh at each start for exactly the names the hub answers to, and client-certificate requests
//! for X.509 device authentication.
//!
//! - The CA (`ca.pem`, `ca.key`) is generated once with `rcgen` and reused, so users trust it
//!   once. The server certificate is re-issued from it at every start (a few milliseconds), so
//!   its SANs always match the current `--hostname`, `--bind` and `--san` flags. It and its key
//!   are written beside the CA (`server.pem`, `server.key`) for a local Azurite to serve with.
//! - TLS 1.2 stays enabled: the Python device SDK speaks only 1.2 (`shared/protocol.md` C.1).
//! - Client certificates are requested but not required, and any certificate is accepted at the
//!   TLS layer (after checking the handshake signature proves possession of its key). The hub
//!   then authenticates it by thumbprint or subject, as IoT Hub does for self-signed
//!   certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::{ring, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsName, ServerConfig,
    SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CA_CERT_FILE: &str = "ca.pem";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server.key";
const CA_KEY_FILE: &str = "ca.key";
const CA_NAME: &str = "iothub-emulator local CA (insecure, emulator only)";

/// Where a user-supplied server certificate and key come from, instead of the generated ones.
#[derive(Debug, Clone)]
pub struct UserCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The result of setting TLS up: the config to serve with and the CA path to tell users about.
pub struct Tls {
    pub server_config: Arc<ServerConfig>,
    /// The CA file clients must trust (the generated CA, or the user's certificate chain).
    pub ca_path: PathBuf,
    /// The issued server certificate chain and its key, written beside the CA
    /// (`server.pem`, `server.key`) so that a local Azurite can serve HTTPS with a certificate
    /// the same clients trust. `None` with the user's own certificate.
    pub server_files: Option<(PathBuf, PathBuf)>,
}

/// Loads or creates the CA in `certs_dir` and issues a server certificate for `names`, or
/// loads the user's own certificate and key.
pub fn setup(certs_dir: &Path, names: &[String], user: Option<&UserCert>) -> Result<Tls, String> {
    let (chain, key, ca_path, server_files) = match user {
        Some(u) => {
            let chain = read_certs(&u.cert)?;
            let key = read_key(&u.key)?;
            (chain, key, u.cert.clone(), None)
        }
        None => {
            let (ca_params, ca_key, ca_path) = load_or_create_ca(certs_dir)?;
            let ca_cert = ca_params
                .self_signed(&ca_key)
                .map_err(|e| format!("cannot rebuild the CA certificate: {e}"))?;
            let server_key = KeyPair::generate().map_err(|e| e.to_string())?;
            let server = server_params(names)?
                .signed_by(&server_key, &ca_cert, &ca_key)
                .map_err(|e| format!("cannot issue the server certificate: {e}"))?;
            let key = PrivateKeyDer::try_from(server_key.serialize_der())
                .map_err(|e| format!("server key: {e}"))?;
            let cert_path = certs_dir.join(SERVER_CERT_FILE);
            let key_path = certs_dir.join(SERVER_KEY_FILE);
            write_private(&key_path, &server_key.serialize_pem())?;
            std::fs::write(&cert_path, format!("{}{}", server.pem(), ca_cert.pem()))
                .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
            (
                vec![server.der().clone(), ca_cert.der().clone()],
                key,
                ca_path,
                Some((cert_path, key_path)),
            )
        }
    };
    let provider = Arc::new(ring::default_provider());
    let verifier = Arc::new(AnyClientCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the server certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        server_config: Arc::new(config),
        ca_path,
        server_files,
    })
}

/// The CA's parameters are fixed, so rebuilding them from the stored key yields the same
/// subject and key identifier as the stored `ca.pem`, and certificates it issues chain to it.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "iothub-emulator");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

fn load_or_create_ca(dir: &Path) -> Result<(CertificateParams, KeyPair, PathBuf), String> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() && cert_path.exists() {
        let pem = std::fs::read_to_string(&key_path)
            .map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
        let key = KeyPair::from_pem(&pem)
            .map_err(|e| format!("{} is not a usable key: {e}", key_path.display()))?;
        return Ok((ca_params(), key, cert_path));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create certs dir {}: {e}", dir.display()))?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| format!("cannot create the CA: {e}"))?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    Ok((ca_params(), key, cert_path))
}

fn server_params(names: &[String]) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().map_or("localhost", String::as_str),
    );
    params.distinguished_name = dn;
    for name in names {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|_| format!("{name:?} is not a valid certificate name"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    Ok(params)
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{} holds no PEM private key", path.display()))
}

/// Requests a client certificate, accepts any (including self-signed), and checks that the
/// client holds its private key. Which identity the certificate proves is the hub's decision.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    // The handshake signature is checked against the certificate's public key read with
    // x509-parser, not webpki: webpki reads only X.509 v3, and the certificates OpenSSL's
    // simplest commands make (and the Node SDK's e2e tests use) are v1.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let spki = spki_of(cert)?;
        let key = webpki::RawPublicKeyEntity::try_from(&spki)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        // TLS 1.2 does not say which curve or padding: try each algorithm of the scheme.
        let algorithms = self
            .algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algorithms)| *algorithms)
            .ok_or(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
        if algorithms
            .iter()
            .any(|alg| key.verify_signature(*alg, message, dss.signature()).is_ok())
        {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ))
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &spki_of(cert)?,
            dss,
            &self.algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The subject public key (DER SubjectPublicKeyInfo) of a certificate of any X.509 version.
fn spki_of(cert: &CertificateDer<'_>) -> Result<SubjectPublicKeyInfoDer<'static>, rustls::Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(SubjectPublicKeyInfoDer::from(
        parsed.tbs_certificate.subject_pki.raw.to_vec(),
    ))
}

/// Facts about a client certificate that X.509 authentication needs.
#[derive(Debug, Clone)]
pub struct ClientCertInfo {
    /// SHA-1 thumbprint, upper-case hex (what IoT Hub's `primaryThumbprint` usually holds).
    pub sha1: String,
    /// SHA-256 thumbprint, upper-case hex.
    pub sha256: String,
    /// The subject's common name (`deviceId` or `deviceId/moduleId` for CA-signed devices).
    pub common_name: Option<String>,
    /// The certificate and the intermediates the client sent, for chain validation.
    pub chain: Vec<CertificateDer<'static>>,
}

impl ClientCertInfo {
    /// Reads the facts from a client's certificate chain (end entity first); `None` when the
    /// client sent no certificate.
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        use sha1::Digest as _;
        let der = chain.first()?;
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02X}")).collect::<String>();
        let common_name = x509_parser::parse_x509_certificate(der)
            .ok()
            .and_then(|(_, cert)| {
                let cn = cert.subject().iter_common_name().next()?;
                cn.as_str().ok().map(str::to_owned)
            });
        Some(Self {
            sha1: hex(&sha1::Sha1::digest(der)),
            sha256: hex(&sha2::Sha256::digest(der)),
            common_name,
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
        })
    }

    /// Whether the chain leads to one of `cas` and is valid now for client authentication.
    pub fn chains_to(&self, cas: &[CertificateDer<'static>]) -> bool {
        self.chains_to_v3(cas) || self.v1_chains_to(cas)
    }

    /// The chain check of webpki: every certificate v3, key usage and validity checked.
    fn chains_to_v3(&self, cas: &[CertificateDer<'static>]) -> bool {
        let anchors: Vec<_> = cas
            .iter()
            .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
            .collect();
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return false;
        };
        let Ok(leaf) = webpki::EndEntityCert::try_from(leaf) else {
            return false;
        };
        leaf.verify_for_usage(
            ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_ok()
    }

    /// For an X.509 v1 device certificate (no extensions, so nothing but names, validity and
    /// signatures to check; webpki refuses v1): each certificate must be valid now and signed
    /// by the next one, whose subject is its issuer, up to one of `cas`; intermediates must
    /// be CAs.
    fn v1_chains_to(&self, cas: &[CertificateDer<'static>]) -> bool {
        use x509_parser::prelude::{X509Certificate, X509Version};
        const MAX_DEPTH: usize = 5;
        fn parse<'a>(der: &'a CertificateDer<'_>) -> Option<X509Certificate<'a>> {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .map(|(_, c)| c)
                .filter(|c| c.validity().is_valid())
        }
        let Some(mut current) = self.chain.first().and_then(|c| parse(c)) else {
            return false;
        };
        if current.version() != X509Version::V1 {
            return false;
        }
        let signs = |issuer: &X509Certificate<'_>, cert: &X509Certificate<'_>| {
            issuer.subject() == cert.issuer()
                && cert.verify_signature(Some(issuer.public_key())).is_ok()
        };
        let anchors: Vec<_> = cas.iter().filter_map(|c| parse(c)).collect();
        let intermediates: Vec<_> = self.chain[1..]
            .iter()
            .filter_map(|c| parse(c))
            .filter(|c| c.tbs_certificate.is_ca())
            .collect();
        for _ in 0..MAX_DEPTH {
            if anchors.iter().any(|ca| signs(ca, &current)) {
                return true;
            }
            match intermediates.iter().find(|i| signs(i, &current)) {
                Some(next) => current = next.clone(),
                None => return false,
            }
        }
        false
    }

    /// Loads CA certificates (PEM) that CA-signed device certificates must chain to.
    ///
    /// # Errors
    /// When a file cannot be read or holds no certificate.
    pub fn load_cas(paths: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut cas = Vec::new();
        for path in paths {
            cas.extend(read_certs(path)?);
        }
        Ok(cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.2".to_owned()];
        let first = setup(dir.path(), &names, None).unwrap();
        let ca_before = std::fs::read_to_string(&first.ca_path).unwrap();
        let second = setup(dir.path(), &names, None).unwrap();
        assert_eq!(std::fs::read_to_string(&second.ca_path).unwrap(), ca_before);
        assert!(ca_before.contains("BEGIN CERTIFICATE"));
    }
}
