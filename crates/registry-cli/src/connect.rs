//! The connection flags shared by every subcommand, and turning them into a
//! registry.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use pubsub_registry::{Registry, RegistryBuilder};

use crate::error::CliError;

/// Where the registry lives and how to log in; every flag has an
/// environment variable, named as the `nats` CLI names them where it has one.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// NATS server URL(s), comma-separated for a cluster.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_name = "URL"
    )]
    pub nats: String,

    /// Use Redis instead of NATS: redis://user:password@host:port/db (all
    /// but the host optional), rediss:// for TLS. Takes precedence over
    /// --nats.
    #[arg(long, global = true, env = "REDIS_URL", value_name = "URL")]
    pub redis: Option<String>,

    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, global = true, env = "NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,

    /// NATS authentication token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// NATS user name (with --password).
    #[arg(long, global = true, env = "NATS_USER")]
    pub user: Option<String>,

    /// NATS password (with --user).
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// CA certificate (PEM) to verify the NATS server with; requires TLS.
    #[arg(long, global = true, env = "NATS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for NATS TLS authentication (with --tls-key).
    #[arg(long, global = true, env = "NATS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Client private key (PEM) for NATS TLS authentication (with --tls-cert).
    #[arg(long, global = true, env = "NATS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// The main topic: the prefix of every subject, one per tenant.
    #[arg(
        long,
        global = true,
        env = "REGISTRY_MAIN_TOPIC",
        default_value = "registry",
        value_name = "TOPIC"
    )]
    pub main_topic: String,

    /// How long to wait for the broker to answer, and for a service to
    /// answer a lookup (e.g. 500ms, 2s).
    #[arg(
        long,
        global = true,
        env = "REGISTRY_TIMEOUT",
        default_value = "1s",
        value_parser = humantime::parse_duration,
        value_name = "DURATION"
    )]
    pub timeout: Duration,
}

impl Connection {
    /// Connects and builds a registry; `configure` adds command-specific
    /// options.
    pub async fn registry(
        &self,
        configure: impl FnOnce(RegistryBuilder) -> RegistryBuilder,
    ) -> Result<Registry, CliError> {
        let builder = Registry::builder()
            .main_topic(&self.main_topic)
            .timeout(self.timeout);
        let (broker, url, builder) = match &self.redis {
            Some(url) => {
                self.no_nats_only_flags()?;
                ("Redis", url.clone(), builder.redis_url(url))
            }
            None => (
                "NATS",
                self.nats.clone(),
                builder.nats_options(&self.nats, self.nats_options().await?),
            ),
        };
        tracing::debug!(broker, %url, "connecting");
        let connect = configure(builder).build();
        // The NATS client has its own connection timeout; Redis does not,
        // and a black-holed address would hang without this one.
        let limit = self.timeout.max(Duration::from_secs(1)) * 2;
        match tokio::time::timeout(limit, connect).await {
            Ok(Ok(registry)) => Ok(registry),
            Ok(Err(e)) => Err(CliError::connect(broker, &url, e)),
            Err(_) => Err(CliError::Connect {
                broker,
                url,
                reason: "timed out".to_string(),
            }),
        }
    }

    /// What to tell the user we are connected to.
    pub fn describe(&self) -> String {
        match &self.redis {
            Some(url) => format!("Redis at {url}"),
            None => format!("NATS at {}", self.nats),
        }
    }

    fn no_nats_only_flags(&self) -> Result<(), CliError> {
        let nats_only = [
            ("--creds", self.creds.is_some()),
            ("--token", self.token.is_some()),
            ("--user", self.user.is_some()),
            ("--tls-ca", self.tls_ca.is_some()),
            ("--tls-cert", self.tls_cert.is_some()),
        ];
        match nats_only.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(CliError::Usage(format!(
                "{flag} is for NATS; with --redis put credentials in the URL \
                 (redis://user:password@host/) and use rediss:// for TLS"
            ))),
            None => Ok(()),
        }
    }

    async fn nats_options(&self) -> Result<async_nats::ConnectOptions, CliError> {
        let mut opts = async_nats::ConnectOptions::new()
            .name("registry-cli")
            .connection_timeout(self.timeout);
        for (flag, path) in [
            ("--creds", &self.creds),
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ] {
            if let Some(path) = path {
                // Checked here: the client's own errors for a missing file
                // name neither the flag nor the file.
                std::fs::File::open(path).map_err(|e| CliError::File {
                    flag,
                    path: path.clone(),
                    reason: crate::error::io_reason(&e),
                })?;
            }
        }
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| CliError::File {
                    flag: "--creds",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        match (&self.user, &self.password) {
            (Some(user), password) => {
                opts = opts.user_and_password(user.clone(), password.clone().unwrap_or_default())
            }
            (None, Some(_)) => return Err(CliError::Usage("--password needs --user".into())),
            (None, None) => {}
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                opts = opts
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(CliError::Usage(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        }
        Ok(opts)
    }
}
