//! The `iothub-emulator` binary: parse flags, set up logging and TLS, bind, run.

use anyhow::{bail, Context};
use clap::Parser;
use iothub_emulator::config::{Config, ConfigFile};
use iothub_emulator::{tls, Hub, Listeners};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// A local emulator of Azure IoT Hub: the MQTT device protocol and the HTTPS service API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Host name of the hub, as in connection strings (HostName=…).
    #[arg(long, default_value = "localhost")]
    hostname: String,
    /// Address to listen on. Another loopback address (e.g. 127.0.0.2) lets several emulators
    /// run side by side on the standard ports; reach it with GatewayHostName.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port of the HTTPS service API and of MQTT over WebSockets. The SDKs expect 443.
    #[arg(long, default_value_t = 443)]
    https_port: u16,
    /// Port of MQTT over TLS. The SDKs expect 8883.
    #[arg(long, default_value_t = 8883)]
    mqtt_port: u16,
    /// Port of AMQP over TLS (devices, service cloud-to-device, Event Hub-compatible
    /// endpoint). The SDKs expect 5671.
    #[arg(long, default_value_t = 5671)]
    amqp_port: u16,
    /// Directory of the emulator's CA (ca.pem, ca.key), created on first start and reused.
    #[arg(long, env = "IOTHUB_EMULATOR_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Extra name or IP address for the server certificate (repeatable).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Serve this PEM certificate chain instead of generating one (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TOML config file: hostname, policies and keys, seeded devices and modules.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the registry, twins and queued messages in this directory across restarts
    /// (default: in memory only).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print the commented example config file and exit.
    #[arg(long)]
    print_config: bool,
    /// Storage account file uploads go to, as a storage connection string; `none` turns file
    /// upload off. Default: Azurite's well-known account at https://127.0.0.1:10000 (start
    /// Azurite with --cert/--key of the certs dir's server.pem and server.key).
    #[arg(long, env = "IOTHUB_EMULATOR_STORAGE_CONNECTION_STRING")]
    storage_connection_string: Option<String>,
    /// Blob container file uploads go to (created if missing). Default: fileuploads.
    #[arg(long)]
    file_upload_container: Option<String>,
    /// Most connections each listener (HTTPS, MQTT, AMQP) holds open at once. Default: what the
    /// process's open-file limit allows (HTTPS gets an eighth, at most 1024; MQTT and AMQP split
    /// the rest).
    #[arg(long)]
    max_connections: Option<usize>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The default certs directory: per user, so restarts keep the same CA.
fn default_certs_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("iothub-emulator/certs");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/iothub-emulator/certs");
    }
    PathBuf::from(".iothub-emulator/certs")
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iothub-emulator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.print_config {
        print!("{}", iothub_emulator::config::EXAMPLE_CONFIG);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("iothub_emulator=info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let file = match &cli.config {
        Some(path) => ConfigFile::load(path).map_err(anyhow::Error::msg)?,
        None => ConfigFile::default(),
    };
    let policies = file
        .policies()
        .map_err(|e| anyhow::anyhow!("config file: {e}"))?;
    let mut config = Config {
        hostname: file.hostname.clone().unwrap_or(cli.hostname.clone()),
        bind: cli.bind,
        https_port: cli.https_port,
        mqtt_port: cli.mqtt_port,
        amqp_port: cli.amqp_port,
        certs_dir: cli.certs_dir.clone().unwrap_or_else(default_certs_dir),
        extra_sans: cli.sans.clone(),
        policies,
        max_modules_per_device: file.max_modules_per_device.unwrap_or(50),
        telemetry_capacity: file
            .telemetry_log_size
            .unwrap_or(iothub_emulator::telemetry::DEFAULT_CAPACITY),
        seeds: file.seeds(),
        trusted_cas: tls::ClientCertInfo::load_cas(&file.trusted_ca_files)
            .map_err(|e| anyhow::anyhow!("config file: trusted_ca_files: {e}"))?,
        routing: Default::default(),
    };
    config.routing = file
        .routing(&config.hub_name())
        .map_err(anyhow::Error::msg)?;
    let user_cert = cli
        .tls_cert
        .clone()
        .zip(cli.tls_key.clone())
        .map(|(cert, key)| tls::UserCert { cert, key });
    let tls = tls::setup(&config.certs_dir, &config.host_names(), user_cert.as_ref())
        .map_err(anyhow::Error::msg)
        .context("TLS setup failed")?;

    let file_upload = file_upload_settings(&cli, &file, &tls)?;

    let hub = match &cli.data_dir {
        None => Hub::new(&config),
        Some(dir) => {
            let store = iothub_emulator::store::Store::open(dir)?;
            let registry = iothub_emulator::registry::Registry::with_store(
                config.max_modules_per_device,
                store,
            )
            .map_err(|e| anyhow::anyhow!("data dir {}: {e}", dir.display()))?;
            Hub::with_registry(&config, registry)
        }
    };
    hub.seed()
        .map_err(|e| anyhow::anyhow!("config file: {e}"))?;

    let limits = match cli.max_connections {
        Some(n) => iothub_emulator::transport::ConnectionLimits::each(n),
        None => iothub_emulator::transport::ConnectionLimits::for_this_process(),
    };
    iothub_emulator::transport::log_panics();

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let https = bind(config.bind, config.https_port, "--https-port").await?;
        let mqtt = bind(config.bind, config.mqtt_port, "--mqtt-port").await?;
        let amqp = bind(config.bind, config.amqp_port, "--amqp-port").await?;
        print_banner(
            &config,
            &tls.ca_path,
            &file_upload_line(file_upload.as_ref(), &tls),
            [https.local_addr()?, mqtt.local_addr()?, amqp.local_addr()?],
        );
        if let Ok(pem) = std::fs::read_to_string(&tls.ca_path) {
            hub.set_ca_pem(pem);
        }
        if let Some(settings) = &file_upload {
            hub.set_file_uploads(settings.clone());
        }
        iothub_emulator::run(
            hub,
            Listeners {
                https,
                mqtt,
                amqp: Some(amqp),
                limits,
                http_timeouts: Default::default(),
            },
            tls.server_config,
            shutdown_signal(),
        )
        .await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The file-upload settings from the flags, else the config file, else Azurite's defaults;
/// `None` when the connection string is `none`.
fn file_upload_settings(
    cli: &Cli,
    file: &ConfigFile,
    tls: &tls::Tls,
) -> anyhow::Result<Option<iothub_emulator::uploads::Settings>> {
    use iothub_emulator::storage::{azurite_connection_string, Account, BlobStore};
    let section = file.file_upload.as_ref();
    let connection_string = cli
        .storage_connection_string
        .clone()
        .or_else(|| section.and_then(|s| s.connection_string.clone()))
        .unwrap_or_else(azurite_connection_string);
    if connection_string.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let container = cli
        .file_upload_container
        .clone()
        .or_else(|| section.and_then(|s| s.container.clone()))
        .unwrap_or_else(|| "fileuploads".to_owned());
    if !iothub_emulator::storage::valid_container_name(&container) {
        bail!("file upload container {container:?} is not a valid container name (3-63 lower-case letters, digits and single hyphens)");
    }
    let account = Account::parse(&connection_string)
        .map_err(|e| anyhow::anyhow!("storage connection string: {e}"))?;
    let roots = std::fs::read(&tls.ca_path).unwrap_or_default();
    let store = BlobStore::new(account, &roots).map_err(anyhow::Error::msg)?;
    Ok(Some(iothub_emulator::uploads::Settings {
        store,
        container,
    }))
}

async fn bind(ip: IpAddr, port: u16, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::new(ip, port);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) => bail!(
            "cannot listen on {addr}: {e}. Ports below 1024 need privileges; choose another port with {flag}, or another address with --bind (for example 127.0.0.2)."
        ),
    }
}

/// The banner's file-upload line: where uploads go, and how to start Azurite for them.
fn file_upload_line(
    settings: Option<&iothub_emulator::uploads::Settings>,
    tls: &tls::Tls,
) -> String {
    let Some(settings) = settings else {
        return "File upload: off".to_owned();
    };
    let mut line = format!(
        "File upload: container {} at {}",
        settings.container, settings.store.account.blob_endpoint
    );
    if let Some((cert, key)) = &tls.server_files {
        line.push_str(&format!(
            " (Azurite: azurite-blob --loose --cert {} --key {})",
            cert.display(),
            key.display()
        ));
    }
    line
}

/// The banner's routing lines: each custom endpoint's connection string, and whether the
/// fallback route is off. Empty for a hub with no routing configured.
fn routing_lines(config: &Config) -> String {
    let mut out = String::new();
    let routing = &config.routing;
    let builtin = config.event_hub_connection_string();
    let base = builtin
        .rsplit_once(";EntityPath=")
        .map_or(builtin.as_str(), |(b, _)| b);
    for name in &routing.endpoint_names()[1..] {
        out.push_str(&format!(
            "Routing endpoint {name}: {base};EntityPath={name}\n"
        ));
    }
    if !routing.routes().is_empty() || !routing.fallback() {
        out.push_str(&format!(
            "Routes: {} ({} enabled); fallback route {}\n",
            routing.routes().len(),
            routing.routes().iter().filter(|r| r.enabled).count(),
            if routing.fallback() { "on" } else { "off" }
        ));
    }
    out
}

fn print_banner(
    config: &Config,
    ca: &std::path::Path,
    file_upload: &str,
    [https, mqtt, amqp]: [SocketAddr; 3],
) {
    let ca = ca.display();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "iothub-emulator {version}: HTTPS (service API, MQTT and AMQP over WebSockets) on {https}, MQTT/TLS on {mqtt}, AMQP/TLS on {amqp}\n\
         Portal: https://{portal_host}:{portal_port}/\n\
         Owner connection string (emulator only, insecure):\n  {cs}\n\
         Event Hub-compatible endpoint: {eh}\n\
         {routing}\
         {file_upload}\n\
         CA certificate to trust: {ca}\n\
         \x20 Python device SDK: SSL_CERT_FILE={ca} (or server_verification_cert=<contents>)\n\
         \x20 Python service SDK and az CLI: REQUESTS_CA_BUNDLE={ca}\n\
         \x20 Node SDKs: NODE_EXTRA_CA_CERTS={ca}\n\
         iothub-emulator ready",
        version = env!("CARGO_PKG_VERSION"),
        cs = config.owner_connection_string(),
        eh = config.event_hub_connection_string(),
        routing = routing_lines(config),
        portal_host = config.hostname,
        portal_port = https.port(),
    );
    let _ = out.flush();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
