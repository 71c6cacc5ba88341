//! Protection of the HTTP server for deployments that expose it: basic auth on `/metrics`
//! and the API, and TLS.
//!
//! `/healthz` and `/readyz` stay open (orchestrators probe them without credentials), and the
//! webhooks carry their own HMAC signatures.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// How the server protects itself.
#[derive(Clone, Default)]
pub struct Security {
    /// `username:password` required on `/metrics` and `/api/*`.
    pub basic_auth: Option<Arc<BasicAuth>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The expected `Authorization: Basic` credentials.
pub struct BasicAuth {
    expected: Vec<u8>,
}

impl BasicAuth {
    pub fn new(username: &str, password: &str) -> BasicAuth {
        BasicAuth {
            expected: format!("{username}:{password}").into_bytes(),
        }
    }

    fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|value| value.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(given) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        // Same time whatever the first differing byte.
        given.len() == self.expected.len()
            && given
                .iter()
                .zip(&self.expected)
                .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                == 0
    }
}

/// Middleware: 401 with `WWW-Authenticate` unless the request carries the credentials.
pub async fn require_basic_auth(
    State(auth): State<Arc<BasicAuth>>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if auth.accepts(authorization) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"kpi-engine\"")],
            axum::Json(serde_json::json!({"error": "authentication required"})),
        )
            .into_response()
    }
}

/// A TLS server configuration from PEM files; errors name the file.
pub fn tls_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|error| format!("http.tls_cert_file: {}: {error}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "http.tls_cert_file: {}: no certificate",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|error| format!("http.tls_key_file: {}: {error}", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| format!("TLS: {error}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|error| format!("http.tls_key_file: does not match the certificate: {error}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_credentials_pass() {
        let auth = BasicAuth::new("prometheus", "correct horse battery");
        let encode = |text: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(text)
            )
        };
        assert!(auth.accepts(Some(&encode("prometheus:correct horse battery"))));
        assert!(!auth.accepts(Some(&encode("prometheus:correct horse batter"))));
        assert!(!auth.accepts(Some(&encode("Prometheus:correct horse battery"))));
        assert!(!auth.accepts(Some("Bearer x")));
        assert!(!auth.accepts(None));
    }
}
