//! The built-in connector kinds.

pub mod brevo;
pub mod csv_folder;
pub mod emailing;
pub mod exec;
pub mod google_ads;
pub mod hubspot;
pub mod linkedin_ads;
pub mod mailchimp;
pub mod meta_ads;
pub mod oauth;
pub mod pipedrive;
pub mod webhook;

use serde_json::Value;

/// A string field of a JSON object, e.g. `field(&row, "/campaign/name")`.
pub(crate) fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// The base URL without its trailing slash.
pub(crate) fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}
