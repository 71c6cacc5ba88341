//! The HTTP client of the HTTP connector kinds.
//!
//! One request is attempted up to [`RetryPolicy::max_attempts`] times: network failures, 5xx
//! replies and 429 (rate limited) are retried with exponential back-off, waiting instead what
//! the upstream asks for when it says (`Retry-After` in seconds or as an HTTP date, or a
//! `retryDelay` in a Google-style error body). A 401 is returned at once as
//! [`ConnectError::Unauthorized`] so that OAuth kinds can refresh their token and try again;
//! other 4xx replies are not retried. Errors carry the upstream's own message.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::warn;

use crate::ConnectError;

/// How hard to retry one request.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this fails the request (the scheduler retries the run later).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// What an error reply means, when a platform says it in the body rather than the status
/// (Meta answers 400 with error code 17 for a rate limit and 190 for an expired token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    RateLimited,
    Unauthorized,
    Transient,
}

/// Reads a platform's error reply: `None` leaves the status code to decide.
pub type Classifier = fn(StatusCode, &str) -> Option<Verdict>;

/// A client for one upstream service.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    service: String,
    policy: RetryPolicy,
    classifier: Option<Classifier>,
}

impl Http {
    pub fn new(service: &str) -> Result<Http, ConnectError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("kpi-engine/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|error| ConnectError::Local(format!("HTTP client: {error}")))?;
        Ok(Http {
            client,
            service: service.to_string(),
            policy: RetryPolicy::default(),
            classifier: None,
        })
    }

    pub fn with_classifier(mut self, classifier: Classifier) -> Http {
        self.classifier = Some(classifier);
        self
    }

    pub fn with_policy(mut self, policy: RetryPolicy) -> Http {
        self.policy = policy;
        self
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Sends the request `build` makes (called again for each attempt), with retries.
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ConnectError> {
        let mut backoff = self.policy.initial_backoff;
        let mut attempt = 1;
        loop {
            let failure = match build(&self.client).send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status();
                    let header_wait = retry_after(&response);
                    let body = response.text().await.unwrap_or_default();
                    let message = format!("HTTP {}: {}", status.as_u16(), upstream_message(&body));
                    let wait = header_wait.or_else(|| retry_delay_in_body(&body));
                    let verdict = self.classifier.and_then(|classify| classify(status, &body));
                    if verdict == Some(Verdict::Unauthorized) || status == StatusCode::UNAUTHORIZED
                    {
                        return Err(ConnectError::Unauthorized {
                            service: self.service.clone(),
                            message,
                        });
                    }
                    if verdict == Some(Verdict::RateLimited)
                        || status == StatusCode::TOO_MANY_REQUESTS
                    {
                        Failure::RateLimited { message, wait }
                    } else if verdict == Some(Verdict::Transient) || status.is_server_error() {
                        Failure::Transient { message, wait }
                    } else {
                        return Err(ConnectError::Upstream {
                            service: self.service.clone(),
                            message,
                        });
                    }
                }
                Err(error) => Failure::Transient {
                    message: describe_reqwest_error(&error),
                    wait: None,
                },
            };
            let (message, wait) = match &failure {
                Failure::RateLimited { message, wait } | Failure::Transient { message, wait } => {
                    (message.clone(), *wait)
                }
            };
            let too_long = wait.is_some_and(|wait| wait > self.policy.max_retry_after);
            if attempt >= self.policy.max_attempts || too_long {
                return Err(match failure {
                    Failure::RateLimited { wait, .. } => ConnectError::RateLimited {
                        service: self.service.clone(),
                        message,
                        retry_after: wait,
                    },
                    Failure::Transient { .. } => ConnectError::Transient {
                        service: self.service.clone(),
                        message,
                    },
                });
            }
            let delay = wait.unwrap_or(backoff);
            warn!(service = %self.service, attempt, delay_ms = delay.as_millis() as u64, error = %message, "request failed; retrying");
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.policy.max_backoff);
            attempt += 1;
        }
    }

    /// [`Http::send`], then decodes a JSON body.
    pub async fn json<T: DeserializeOwned>(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<T, ConnectError> {
        let response = self.send(build).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|error| ConnectError::Transient {
                service: self.service.clone(),
                message: describe_reqwest_error(&error),
            })?;
        serde_json::from_slice(&bytes)
            .map_err(|error| self.protocol(format!("{error} in {}", excerpt(&bytes))))
    }

    /// A [`ConnectError::Protocol`] for this service.
    pub fn protocol(&self, message: impl Into<String>) -> ConnectError {
        ConnectError::Protocol {
            service: self.service.clone(),
            message: message.into(),
        }
    }
}

enum Failure {
    RateLimited {
        message: String,
        wait: Option<Duration>,
    },
    Transient {
        message: String,
        wait: Option<Duration>,
    },
}

/// How long the upstream asks to wait, from the headers platforms use:
/// - `Retry-After: 30` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT` (RFC 9110);
/// - Brevo's `x-sib-ratelimit-reset: 30` and Pipedrive's `x-ratelimit-reset: 2`, seconds
///   until the limit resets;
/// - Meta's `X-Business-Use-Case-Usage` (and `X-Ad-Account-Usage`), whose entries carry
///   `estimated_time_to_regain_access` in minutes
///   (<https://developers.facebook.com/docs/graph-api/overview/rate-limiting>).
fn retry_after(response: &Response) -> Option<Duration> {
    let headers = response.headers();
    if let Some(wait) = ["x-business-use-case-usage", "x-ad-account-usage"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .filter_map(meta_regain_access)
        .max()
    {
        return Some(wait);
    }
    let value = headers
        .get(reqwest::header::RETRY_AFTER)
        .or_else(|| headers.get("x-sib-ratelimit-reset"))
        .or_else(|| headers.get("x-ratelimit-reset"))?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = DateTime::parse_from_rfc2822(value).ok()?;
    let seconds = (when.with_timezone(&Utc) - Utc::now())
        .num_milliseconds()
        .max(0);
    Some(Duration::from_millis(seconds as u64))
}

/// The longest `estimated_time_to_regain_access` (minutes) of a Meta usage header: an object
/// of arrays of usage entries (business use case), or one entry (ad account); `None` when it
/// says 0 or nothing.
fn meta_regain_access(header: &str) -> Option<Duration> {
    let value: Value = serde_json::from_str(header).ok()?;
    let mut minutes: Option<u64> = None;
    let mut take = |entry: &Value| {
        if let Some(m) = entry
            .get("estimated_time_to_regain_access")
            .and_then(Value::as_u64)
        {
            minutes = Some(minutes.map_or(m, |current| current.max(m)));
        }
    };
    take(&value);
    if let Value::Object(map) = &value {
        for entries in map.values() {
            for entry in entries.as_array().into_iter().flatten() {
                take(entry);
            }
        }
    }
    minutes
        .filter(|m| *m > 0)
        .map(|m| Duration::from_secs(m.saturating_mul(60)))
}

/// Google APIs put the wait in the error details: `"retryDelay": "30s"`.
fn retry_delay_in_body(body: &str) -> Option<Duration> {
    let start = body.find("\"retryDelay\"")?;
    let rest = &body[start + "\"retryDelay\"".len()..];
    let open = rest.find('"')?;
    let rest = &rest[open + 1..];
    let close = rest.find('"')?;
    let text = rest[..close].trim_end_matches('s');
    let seconds: f64 = text.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// The message an API put in its error body, under the usual names; else the body's start.
pub fn upstream_message(body: &str) -> String {
    if let Ok(value) = serde_json::from_str::<Value>(body) {
        let candidates = [
            value.pointer("/error/message"),
            value.pointer("/message"),
            value.pointer("/detail"),
            value.pointer("/error_description"),
            value.pointer("/error"),
            value.pointer("/title"),
        ];
        for candidate in candidates.into_iter().flatten() {
            if let Some(text) = candidate.as_str() {
                return text.to_string();
            }
        }
    }
    excerpt(body.as_bytes())
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    trimmed.chars().take(300).collect()
}

fn describe_reqwest_error(error: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which may carry query-string credentials.
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "reading the reply failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(error);
    let mut detail = String::new();
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_the_usual_fields() {
        assert_eq!(
            upstream_message(
                r#"{"error":{"code":429,"message":"Too many requests","status":"RESOURCE_EXHAUSTED"}}"#
            ),
            "Too many requests"
        );
        assert_eq!(
            upstream_message(r#"{"status":"error","message":"Invalid token"}"#),
            "Invalid token"
        );
        assert_eq!(
            upstream_message(
                r#"{"title":"API Key Invalid","detail":"Your API key may be invalid"}"#
            ),
            "Your API key may be invalid"
        );
        assert_eq!(upstream_message("Bad gateway"), "Bad gateway");
        assert_eq!(upstream_message(""), "(empty body)");
    }

    #[test]
    fn meta_usage_headers_say_how_many_minutes_to_wait() {
        let business = r#"{"66782684":[{"type":"ads_management","call_count":95,"total_cputime":20,"total_time":20,"estimated_time_to_regain_access":0},{"type":"ads_insights","call_count":100,"total_cputime":30,"total_time":40,"estimated_time_to_regain_access":7}]}"#;
        assert_eq!(
            meta_regain_access(business),
            Some(Duration::from_secs(7 * 60))
        );
        let account = r#"{"acc_id_util_pct":100,"reset_time_duration":120,"estimated_time_to_regain_access":2}"#;
        assert_eq!(meta_regain_access(account), Some(Duration::from_secs(120)));
        assert_eq!(
            meta_regain_access(r#"{"1":[{"estimated_time_to_regain_access":0}]}"#),
            None
        );
        assert_eq!(meta_regain_access("not json"), None);
    }

    #[test]
    fn google_retry_delay_is_read_from_the_body() {
        let body = r#"{"error":{"details":[{"errors":[{"details":{"quotaErrorDetails":{"retryDelay":"12s"}}}]}]}}"#;
        assert_eq!(retry_delay_in_body(body), Some(Duration::from_secs(12)));
        assert_eq!(retry_delay_in_body("{}"), None);
    }
}
