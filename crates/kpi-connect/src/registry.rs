//! The built-in connector kinds, listed by hand, erased behind [`DynConnector`].

use std::future::Future;
use std::pin::Pin;

use serde_json::{Map, Value};

use crate::kinds::{
    brevo::Brevo, csv_folder::CsvFolder, exec::Exec, google_ads::GoogleAds, hubspot::HubSpot,
    linkedin_ads::LinkedInAds, mailchimp::Mailchimp, meta_ads::MetaAds, pipedrive::Pipedrive,
    webhook::Webhook,
};
use crate::{ConnectError, Connector, RunContext, RunOutput};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Builds a connector from its params; the `&str` prefixes error keys.
type Builder = fn(Map<String, Value>, &str) -> Result<Box<dyn DynConnector>, ConnectError>;

/// A connector of any kind.
pub trait DynConnector: Send + Sync {
    /// See [`Connector::POLLS`].
    fn polls(&self) -> bool;
    /// See [`Connector::api_version`].
    fn api_version(&self) -> Option<&str>;
    fn check<'a>(&'a self, context: &'a RunContext) -> BoxFuture<'a, Result<String, ConnectError>>;
    fn run<'a>(&'a self, context: &'a RunContext)
        -> BoxFuture<'a, Result<RunOutput, ConnectError>>;
}

impl<T: Connector> DynConnector for T {
    fn polls(&self) -> bool {
        T::POLLS
    }

    fn api_version(&self) -> Option<&str> {
        Connector::api_version(self)
    }

    fn check<'a>(&'a self, context: &'a RunContext) -> BoxFuture<'a, Result<String, ConnectError>> {
        Box::pin(Connector::check(self, context))
    }

    fn run<'a>(
        &'a self,
        context: &'a RunContext,
    ) -> BoxFuture<'a, Result<RunOutput, ConnectError>> {
        Box::pin(Connector::run(self, context))
    }
}

/// A kind this build knows.
pub struct KindInfo {
    pub name: &'static str,
    pub description: &'static str,
    build: Builder,
}

fn entry<T: Connector>() -> KindInfo {
    KindInfo {
        name: T::KIND,
        description: T::DESCRIPTION,
        build: |params, key| {
            let params: T::Params =
                serde_json::from_value(Value::Object(params)).map_err(|error| {
                    ConnectError::Config {
                        key: key.to_string(),
                        message: error.to_string(),
                    }
                })?;
            Ok(Box::new(T::new(params).map_err(|error| match error {
                ConnectError::Config {
                    key: field,
                    message,
                } => ConnectError::Config {
                    key: format!("{key}.{field}"),
                    message,
                },
                other => other,
            })?))
        },
    }
}

/// Every built-in kind.
pub fn kinds() -> Vec<KindInfo> {
    vec![
        entry::<GoogleAds>(),
        entry::<MetaAds>(),
        entry::<LinkedInAds>(),
        entry::<Mailchimp>(),
        entry::<Brevo>(),
        entry::<HubSpot>(),
        entry::<Pipedrive>(),
        entry::<CsvFolder>(),
        entry::<Exec>(),
        entry::<Webhook>(),
    ]
}

/// Builds a connector of `kind` from its (expanded) params; `key` prefixes error keys
/// (`connectors[0].params`).
pub fn build(
    kind: &str,
    params: Map<String, Value>,
    key: &str,
) -> Result<Box<dyn DynConnector>, ConnectError> {
    let info = kinds()
        .into_iter()
        .find(|info| info.name == kind)
        .ok_or_else(|| ConnectError::Config {
            key: key.trim_end_matches(".params").to_string() + ".kind",
            message: format!("`{kind}` is not a connector kind of this build"),
        })?;
    (info.build)(params, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_and_the_configuration_list_the_same_kinds() {
        let mut registered: Vec<&str> = kinds().iter().map(|info| info.name).collect();
        let mut configured = kpi_config::CONNECTOR_KINDS.to_vec();
        registered.sort_unstable();
        configured.sort_unstable();
        assert_eq!(registered, configured);
    }
}
