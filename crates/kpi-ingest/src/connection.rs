//! Connections to NATS: the servers of `nats.url`, credentials and time-outs, the same for the
//! engine and every command.

use std::sync::Arc;
use std::time::Duration;

use crate::{EngineState, IngestError};
use kpi_config::Config;
use tracing::{debug, warn};

/// Who connects: the engine keeps trying until NATS answers (and reconnects for ever); a
/// command fails at once with the server's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Engine,
    Command,
}

/// The options of every connection to NATS, from `[nats]`: servers, credentials (a `.creds`
/// file, user and password, or a token) and time-outs. Every command and the engine connect
/// with these.
pub(crate) async fn connect_options(
    config: &Config,
    connection: Connection,
) -> Result<async_nats::ConnectOptions, IngestError> {
    let nats = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(match connection {
            Connection::Engine => "kpi-engine",
            Connection::Command => "kpi-command",
        })
        .connection_timeout(Duration::from_secs(5));
    if connection == Connection::Engine {
        options = options.retry_on_initial_connect();
    }
    if !nats.credentials_file.is_empty() {
        options = options
            .credentials_file(&nats.credentials_file)
            .await
            .map_err(|error| IngestError::Connect {
                url: nats.url.clone(),
                message: format!("nats.credentials_file: {error}"),
            })?;
    }
    if !nats.user.is_empty() {
        options = options.user_and_password(nats.user.clone(), nats.password.clone());
    }
    if !nats.token.is_empty() {
        options = options.token(nats.token.clone());
    }
    Ok(options)
}

/// The servers of `nats.url` (one, or several separated by commas), for `connect`.
pub(crate) fn server_addrs(config: &Config) -> Result<Vec<async_nats::ServerAddr>, IngestError> {
    config
        .nats
        .servers()
        .into_iter()
        .map(|server| {
            server.parse().map_err(|error| IngestError::Connect {
                url: config.nats.url.clone(),
                message: format!("nats.url: `{server}`: {error}"),
            })
        })
        .collect()
}

/// Connects a command (`kpi publish`, `demo`, `import`, `connectors ...`) to NATS with the
/// configured servers and credentials; fails with the server's reason.
pub async fn connect_command(config: &Config) -> Result<async_nats::Client, IngestError> {
    let options = connect_options(config, Connection::Command).await?;
    let url = &config.nats.url;
    let servers = server_addrs(config)?;
    tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
        .await
        .map_err(|_| IngestError::Connect {
            url: url.clone(),
            message: "no answer within 30 s".into(),
        })?
        .map_err(|error| IngestError::Connect {
            url: url.clone(),
            message: error.to_string(),
        })
}

/// Connects the engine to NATS (with its settings and credentials) and records connection
/// state in the engine's metrics.
pub async fn connect(
    config: &Config,
    state: Option<Arc<EngineState>>,
) -> Result<async_nats::Client, IngestError> {
    let nats = &config.nats;
    let mut options = connect_options(config, Connection::Engine).await?;
    if let Some(state) = state {
        options = options.event_callback(move |event| {
            let state = state.clone();
            async move {
                match event {
                    async_nats::Event::Connected => state.set_nats_connected(true),
                    async_nats::Event::Disconnected => {
                        state.set_nats_connected(false);
                        warn!("disconnected from NATS; reconnecting");
                    }
                    other => debug!(event = %other, "NATS event"),
                }
            }
        });
    }
    let servers = server_addrs(config)?;
    let client = tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
        .await
        .map_err(|_| IngestError::Connect {
            url: nats.url.clone(),
            message: "no answer within 30 s".into(),
        })?
        .map_err(|error| IngestError::Connect {
            url: nats.url.clone(),
            message: error.to_string(),
        })?;
    Ok(client)
}
