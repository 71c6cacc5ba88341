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

use std::future::Future;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::ConnectError;

/// A string field of a JSON object, e.g. `field(&row, "/campaign/name")`.
pub(crate) fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// A JSON string or number as text (APIs send ids and decimals either way).
pub(crate) fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// The base URL without its trailing slash.
pub(crate) fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// An RFC 3339 time field of a JSON object, in UTC.
pub(crate) fn rfc3339(value: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    text(value, pointer)
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .map(|time| time.with_timezone(&Utc))
}

/// Every item of an offset-paged collection: `fetch(offset)` returns a page's items and the
/// collection's total; pages are read until the total is reached or a page is empty.
pub(crate) async fn offset_pages<F, Fut>(mut fetch: F) -> Result<Vec<Value>, ConnectError>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<(Vec<Value>, usize), ConnectError>>,
{
    let mut items = Vec::new();
    loop {
        let (batch, total) = fetch(items.len()).await?;
        let empty = batch.is_empty();
        items.extend(batch);
        if empty || items.len() >= total {
            return Ok(items);
        }
    }
}

/// The array `field` of a page and the number `total_field` (0 when absent).
pub(crate) fn page_items(page: &Value, field: &str, total_field: &str) -> (Vec<Value>, usize) {
    let items = page
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = page.get(total_field).and_then(Value::as_u64).unwrap_or(0) as usize;
    (items, total)
}
