//! OAuth 2.0 refresh-token flow (RFC 6749 section 6), with the access token cached until it
//! expires or the API refuses it.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::http::Http;
use crate::ConnectError;

/// Credentials that mint access tokens.
pub struct RefreshToken {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    cached: Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl RefreshToken {
    pub fn new(
        token_url: String,
        client_id: String,
        client_secret: String,
        refresh_token: String,
    ) -> RefreshToken {
        RefreshToken {
            token_url,
            client_id,
            client_secret,
            refresh_token,
            cached: Mutex::new(None),
        }
    }

    /// A valid access token: the cached one, or a new one.
    pub async fn access_token(&self, http: &Http) -> Result<String, ConnectError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref() {
            if Instant::now() < *expires {
                return Ok(token.clone());
            }
        }
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.as_str()),
            ("refresh_token", self.refresh_token.as_str()),
        ];
        let reply: TokenReply = match http
            .json(|client| client.post(&self.token_url).form(&form))
            .await
        {
            // The token endpoint answers 400 `invalid_grant` for a revoked refresh token.
            Err(ConnectError::Upstream { service, message }) => {
                return Err(ConnectError::Unauthorized {
                    service,
                    message: format!("refreshing the access token: {message}"),
                })
            }
            other => other?,
        };
        // A minute of margin, so a token does not expire between here and the call.
        let lifetime = Duration::from_secs(reply.expires_in.unwrap_or(3600).saturating_sub(60));
        *cached = Some((reply.access_token.clone(), Instant::now() + lifetime));
        Ok(reply.access_token)
    }

    /// Runs `call` with a valid access token; if the API refuses the token (401), mints a new
    /// one and runs it once more.
    pub async fn call<T, F, Fut>(&self, http: &Http, call: F) -> Result<T, ConnectError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, ConnectError>>,
    {
        let mut refreshed = false;
        loop {
            let token = self.access_token(http).await?;
            match call(token).await {
                Err(ConnectError::Unauthorized { service, message }) if !refreshed => {
                    tracing::info!(%service, refused = %message, "access token refused; minting a new one");
                    self.invalidate().await;
                    refreshed = true;
                }
                other => return other,
            }
        }
    }

    /// Forgets the cached token (the API refused it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}
