//! The loader's clients, both over tokio-rustls: a small async MQTT 3.1.1 client (rumqttc's
//! `mqttbytes::v4` codec, one task per connection, no background event loop) and a minimal
//! HTTP/1.1 keep-alive client for the service REST API.
//!
//! Client sockets go out from 127.0.0.1; when the kernel runs out of ephemeral ports for that
//! source address (`EADDRNOTAVAIL`), later sockets are bound to 127.0.0.2, 127.0.0.3, … before
//! connecting (every 127/8 address is local on Linux).

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::SymmetricKey;
use rumqttc::mqttbytes::v4::{self, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The hub's host name in tokens, usernames and SNI.
pub const HOST: &str = "localhost";
pub const API_VERSION: &str = "2021-04-12";
/// The longest one request may wait for its answer.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a connection attempt (TCP + TLS + CONNECT → CONNACK) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// MQTT keep-alive the clients announce; long enough that no scenario needs PINGREQ.
const KEEP_ALIVE_SECS: u16 = 1200;
const MAX_PACKET: usize = 1024 * 1024;

/// A rustls client config trusting `ca_pem`. Session resumption is off so that every connect
/// is a full handshake, as for a fleet of devices each connecting once.
pub fn tls_config(ca_pem: &str, tls12_only: bool) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("no certificate in the CA PEM");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])?
    } else {
        builder.with_safe_default_protocol_versions()?
    };
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Where a kind of connection goes.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: TlsConnector,
}

/// Loopback source addresses for client sockets; moves on to the next one when the current one
/// has no ephemeral port left.
#[derive(Default)]
pub struct SourceAddrs {
    current: AtomicUsize,
}

impl SourceAddrs {
    /// How many source addresses have been used so far.
    pub fn used(&self) -> usize {
        self.current.load(Ordering::Relaxed) + 1
    }

    fn ip(k: usize) -> Ipv4Addr {
        let k = k % 250;
        Ipv4Addr::new(127, 0, 0, 1 + k as u8)
    }

    /// A TCP connection to `addr` with TCP_NODELAY set.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        for _ in 0..8 {
            let k = self.current.load(Ordering::Relaxed);
            let socket = TcpSocket::new_v4()?;
            if k > 0 {
                // 127.0.0.1 connects unbound, so the kernel can pick ports per destination;
                // further addresses must be bound first.
                if let Err(e) = socket.bind(SocketAddr::new(IpAddr::V4(Self::ip(k)), 0)) {
                    if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable) {
                        let _ = self.current.compare_exchange(
                            k,
                            k + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        continue;
                    }
                    return Err(e.into());
                }
            }
            match socket.connect(addr).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
                    let _ = self.current.compare_exchange(
                        k,
                        k + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no loopback source address with a free port")
    }
}

/// A registered module, with the key the hub generated for it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device: String,
    pub module: String,
    pub key: String,
}

impl Identity {
    pub fn client_id(&self) -> String {
        format!("{}/{}", self.device, self.module)
    }

    /// A module SAS token signed with the module's key (sr `{host}/devices/{d}/modules/{m}`).
    pub fn token(&self, expiry: u64) -> Result<String> {
        let key = SymmetricKey::parse(&self.key).map_err(|e| anyhow!("module key: {e}"))?;
        let resource = format!("{HOST}/devices/{}/modules/{}", self.device, self.module);
        Ok(make_token(&resource, &key, None, expiry))
    }

    /// The module's telemetry topic.
    pub fn events_topic(&self) -> String {
        format!(
            "devices/{}/modules/{}/messages/events/",
            self.device, self.module
        )
    }
}

/// Unix seconds `secs` from now.
pub fn expiry_in(secs: u64) -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + secs
}

/// The owner policy's service token.
pub fn owner_token() -> Result<String> {
    let key = SymmetricKey::parse(iothub_emulator::auth::OWNER_KEY)
        .map_err(|e| anyhow!("owner key: {e}"))?;
    Ok(make_token(
        HOST,
        &key,
        Some("iothubowner"),
        expiry_in(24 * 3600),
    ))
}

/// One MQTT connection.
pub struct Mqtt {
    stream: TlsStream<TcpStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Mqtt {
    /// TCP + TLS + CONNECT (MQTT 3.1.1, username as the SDKs send it, SAS token as password,
    /// clean session 0) → CONNACK 0.
    pub async fn connect(
        endpoint: &Endpoint,
        sources: &SourceAddrs,
        identity: &Identity,
        password: &str,
    ) -> Result<Self> {
        let attempt = async {
            let tcp = sources.connect(endpoint.addr).await?;
            let name = rustls::pki_types::ServerName::try_from(HOST)?;
            let stream = endpoint.tls.connect(name, tcp).await.context("TLS")?;
            let mut mqtt = Self {
                stream,
                rbuf: BytesMut::new(),
                wbuf: BytesMut::new(),
            };
            let client_id = identity.client_id();
            let mut connect = v4::Connect::new(client_id.clone());
            connect.keep_alive = KEEP_ALIVE_SECS;
            connect.clean_session = false;
            connect.set_login(
                format!("{HOST}/{client_id}/?api-version={API_VERSION}"),
                password,
            );
            connect.write(&mut mqtt.wbuf).map_err(codec)?;
            mqtt.flush().await?;
            match mqtt.read().await? {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(mqtt),
                Packet::ConnAck(ack) => bail!("CONNACK {:?}", ack.code),
                other => bail!("expected CONNACK, got {other:?}"),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| anyhow!("connect timed out"))?
    }

    async fn flush(&mut self) -> Result<()> {
        let result = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        }
        .await;
        self.wbuf.clear();
        Ok(result?)
    }

    /// Publishes (QoS 0 or 1; `pkid` only matters for QoS 1).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        pkid: u16,
    ) -> Result<()> {
        let mut publish = v4::Publish::from_bytes(topic, qos, Bytes::copy_from_slice(payload));
        if qos != QoS::AtMostOnce {
            publish.pkid = pkid;
        }
        publish.write(&mut self.wbuf).map_err(codec)?;
        self.flush().await
    }

    /// Subscribes to one filter at QoS 1 and waits for a granted SUBACK.
    pub async fn subscribe(&mut self, filter: &str, pkid: u16) -> Result<()> {
        let mut subscribe = v4::Subscribe::new(filter, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        subscribe.write(&mut self.wbuf).map_err(codec)?;
        self.flush().await?;
        let wait = async {
            loop {
                if let Packet::SubAck(ack) = self.read().await? {
                    if ack.pkid != pkid {
                        continue;
                    }
                    return match ack.return_codes.first() {
                        Some(v4::SubscribeReasonCode::Success(_)) => Ok(()),
                        other => Err(anyhow!("SUBACK {other:?} for {filter}")),
                    };
                }
            }
        };
        tokio::time::timeout(OP_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("no SUBACK for {filter}"))?
    }

    /// The next packet from the server (no timeout: callers bound it).
    pub async fn read(&mut self) -> Result<Packet> {
        loop {
            match v4::read(&mut self.rbuf, MAX_PACKET) {
                Ok(packet) => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 4096 {
                        self.rbuf = BytesMut::new();
                    }
                    return Ok(packet);
                }
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(codec(e)),
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(2048);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// Sends DISCONNECT and closes (errors ignored: the connection is going away anyway).
    pub async fn disconnect(mut self) {
        let _ = v4::Disconnect.write(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

fn codec(e: CodecError) -> anyhow::Error {
    anyhow!("MQTT codec: {e:?}")
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&…]` → (status, rid).
pub fn parse_twin_response(topic: &str) -> Option<(u16, &str)> {
    let rest = topic.strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let rid = query.split('&').find_map(|kv| kv.strip_prefix("$rid="))?;
    Some((status.parse().ok()?, rid))
}

/// `$iothub/methods/POST/{name}/?$rid={rid}` → rid.
pub fn parse_method_request(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("$iothub/methods/POST/")?;
    let (_, query) = rest.split_once("/?")?;
    query.split('&').find_map(|kv| kv.strip_prefix("$rid="))
}

/// An HTTP response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 keep-alive connection to the service API.
pub struct Http {
    stream: TlsStream<TcpStream>,
    rbuf: BytesMut,
    token: Arc<str>,
}

impl Http {
    pub async fn connect(
        endpoint: &Endpoint,
        sources: &SourceAddrs,
        token: Arc<str>,
    ) -> Result<Self> {
        let attempt = async {
            let tcp = sources.connect(endpoint.addr).await?;
            let name = rustls::pki_types::ServerName::try_from(HOST)?;
            let stream = endpoint.tls.connect(name, tcp).await.context("TLS")?;
            Ok::<_, anyhow::Error>(Self {
                stream,
                rbuf: BytesMut::with_capacity(16 * 1024),
                token,
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| anyhow!("HTTPS connect timed out"))?
    }

    /// Sends one request (`api-version` is appended) and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut head = format!(
            "{method} {path}{separator}api-version={API_VERSION} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {}\r\nAccept: application/json\r\n",
            self.token
        );
        if let Some(b) = body {
            head.push_str("Content-Type: application/json; charset=utf-8\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        if let Some(b) = body {
            request.extend_from_slice(b);
        }
        let exchange = async {
            self.stream.write_all(&request).await?;
            self.stream.flush().await?;
            self.read_response().await
        };
        tokio::time::timeout(OP_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("{method} {path}: no response in time"))?
    }

    async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(16 * 1024);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.rbuf, b"\r\n\r\n") {
                break i;
            }
            if self.rbuf.len() > 64 * 1024 {
                bail!("response head too large");
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.rbuf[..head_end])
            .context("response head is not UTF-8")?
            .to_owned();
        self.rbuf.advance(head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = get("content-length").and_then(|v| v.parse::<usize>().ok());
        let body = if chunked {
            self.read_chunked().await?
        } else {
            let length = if status == 204 || status == 304 {
                0
            } else {
                length.ok_or_else(|| anyhow!("response without Content-Length"))?
            };
            while self.rbuf.len() < length {
                self.fill().await?;
            }
            self.rbuf.split_to(length).freeze()
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    async fn read_chunked(&mut self) -> Result<Bytes> {
        let mut body = BytesMut::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.rbuf, b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.rbuf[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            self.rbuf.advance(line_end + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(i) = find(&self.rbuf, b"\r\n") {
                        self.rbuf.advance(i + 2);
                        if i == 0 {
                            return Ok(body.freeze());
                        }
                    } else {
                        self.fill().await?;
                    }
                }
            }
            while self.rbuf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.rbuf[..size]);
            self.rbuf.advance(size + 2);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_response_topics() {
        assert_eq!(
            parse_twin_response("$iothub/twin/res/204/?$rid=17&$version=4"),
            Some((204, "17"))
        );
        assert_eq!(
            parse_twin_response("$iothub/twin/res/200/?$rid=a"),
            Some((200, "a"))
        );
        assert_eq!(parse_twin_response("$iothub/twin/res/200"), None);
        assert_eq!(
            parse_method_request("$iothub/methods/POST/echo/?$rid=9"),
            Some("9")
        );
    }
}
