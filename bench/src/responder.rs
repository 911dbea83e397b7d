//! The yardstick: a deliberately trivial MQTT-over-TLS responder (tokio + rustls + rumqttc's
//! codec). No state, no authentication: CONNECT → CONNACK 0, twin GET → a fixed small 200
//! body, reported PATCH → 204 with `$version=1`, QoS 1 telemetry → PUBACK, SUBSCRIBE → SUBACK.
//! It follows the same lessons as a good broker (TCP_NODELAY, TLS handshake in the connection's
//! task under a timeout, buffers released when empty) so that emulator ÷ responder CPU per
//! operation shows what the emulator adds on top of TLS and MQTT framing.
//!
//! Its certificate is of the emulator's type: an ECDSA P-256 leaf issued by an ECDSA P-256 CA,
//! both made with rcgen at start, sent as a two-certificate chain.

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rumqttc::mqttbytes::v4::{
    self, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Printed on stdout once the responder listens.
pub const READY: &str = "iothub-bench responder ready";
const TWIN_BODY: &[u8] = br#"{"desired":{"$version":1},"reported":{"$version":1}}"#;

#[derive(Debug, clap::Args)]
pub struct ResponderArgs {
    /// Port to listen on (127.0.0.1 only); 0 picks one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write the PEM of the CA that issued the responder's certificate.
    #[arg(long)]
    ca_out: PathBuf,
}

/// Runs the responder until it is killed.
pub fn main(args: ResponderArgs) -> Result<()> {
    let (config, ca_pem) = tls_config()?;
    std::fs::write(&args.ca_out, ca_pem)
        .with_context(|| format!("writing {}", args.ca_out.display()))?;
    // The same runtime the emulator uses (`Runtime::new()`), for a like-for-like comparison.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
        println!("{READY} on {}", listener.local_addr()?);
        let acceptor = TlsAcceptor::from(config);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = serve(acceptor, tcp).await;
            });
        }
    })
}

fn tls_config() -> Result<(Arc<rustls::ServerConfig>, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "iothub-bench responder CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress("127.0.0.1".parse()?),
    ];
    let leaf = params.signed_by(&key, &ca, &ca_key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("responder key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key_der)?;
    Ok((Arc::new(config), ca.pem()))
}

async fn serve(acceptor: TlsAcceptor, tcp: TcpStream) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await??;
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    loop {
        let packet = match v4::read(&mut rbuf, 1024 * 1024) {
            Ok(p) => p,
            Err(CodecError::InsufficientBytes(_)) => {
                // Everything read so far is answered: send the answers, release what is empty.
                if !wbuf.is_empty() {
                    tls.write_all(&wbuf).await?;
                    tls.flush().await?;
                    wbuf = BytesMut::new();
                }
                if rbuf.is_empty() {
                    rbuf = BytesMut::new();
                }
                if rbuf.capacity() - rbuf.len() < 256 {
                    rbuf.reserve(1024);
                }
                if tls.read_buf(&mut rbuf).await? == 0 {
                    return Ok(());
                }
                continue;
            }
            Err(_) => return Ok(()),
        };
        match packet {
            Packet::Connect(_) => {
                ConnAck::new(ConnectReturnCode::Success, false)
                    .write(&mut wbuf)
                    .map_err(codec)?;
            }
            Packet::Publish(p) => {
                let topic = p.topic.as_str();
                let answer = match (
                    topic.strip_prefix("$iothub/twin/GET/?"),
                    topic.strip_prefix("$iothub/twin/PATCH/properties/reported/?"),
                ) {
                    (Some(query), _) => Some((format!("$iothub/twin/res/200/?{query}"), TWIN_BODY)),
                    (_, Some(query)) => Some((
                        format!("$iothub/twin/res/204/?{query}&$version=1"),
                        &b""[..],
                    )),
                    _ => None,
                };
                if let Some((topic, body)) = answer {
                    Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::from_static(body))
                        .write(&mut wbuf)
                        .map_err(codec)?;
                }
                if p.qos == QoS::AtLeastOnce {
                    PubAck::new(p.pkid).write(&mut wbuf).map_err(codec)?;
                }
            }
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    .collect();
                SubAck::new(s.pkid, codes).write(&mut wbuf).map_err(codec)?;
            }
            Packet::PingReq => {
                v4::PingResp.write(&mut wbuf).map_err(codec)?;
            }
            Packet::Disconnect => return Ok(()),
            _ => {}
        }
    }
}

fn codec(e: CodecError) -> anyhow::Error {
    anyhow::anyhow!("MQTT codec: {e:?}")
}
