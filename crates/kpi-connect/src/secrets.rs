//! `${ENV}` references in connector params, and keeping their values out of logs and errors.

use serde_json::{Map, Value};

use crate::ConnectError;

/// Replaces every `${NAME}` in the string values of `params` (at any depth) by the environment
/// variable `NAME`. Returns the expanded params and the values substituted (the secrets).
pub fn expand(
    params: &Map<String, Value>,
    key_prefix: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(Map<String, Value>, Vec<String>), ConnectError> {
    let mut secrets = Vec::new();
    let mut expanded = Map::new();
    for (key, value) in params {
        let full_key = format!("{key_prefix}.{key}");
        expanded.insert(
            key.clone(),
            expand_value(value, &full_key, lookup, &mut secrets)?,
        );
    }
    Ok((expanded, secrets))
}

fn expand_value(
    value: &Value,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<Value, ConnectError> {
    Ok(match value {
        Value::String(text) => Value::String(expand_text(text, key, lookup, secrets)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    expand_value(item, &format!("{key}[{index}]"), lookup, secrets)
                })
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, item)| {
                    expand_value(item, &format!("{key}.{name}"), lookup, secrets)
                        .map(|item| (name.clone(), item))
                })
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

fn expand_text(
    text: &str,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<String, ConnectError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(ConnectError::Config {
                key: key.to_string(),
                message: "`${` without a closing `}`".into(),
            });
        };
        let name = &after[..end];
        let value = lookup(name).ok_or_else(|| ConnectError::Config {
            key: key.to_string(),
            message: format!("environment variable `{name}` is not set"),
        })?;
        if !value.is_empty() {
            secrets.push(value.clone());
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Masks known secret values in text meant for logs, errors and metrics.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(mut secrets: Vec<String>) -> Redactor {
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    pub fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|known| known == secret) {
            self.secrets.push(secret.to_string());
            self.secrets
                .sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        }
    }

    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_expand_and_are_remembered_as_secrets() {
        let params = json!({"token": "Bearer ${TOKEN}", "nested": {"list": ["${ID}"]}, "n": 3});
        let lookup = |name: &str| match name {
            "TOKEN" => Some("s3cret".to_string()),
            "ID" => Some("42".to_string()),
            _ => None,
        };
        let (expanded, secrets) = expand(
            params.as_object().expect("object"),
            "connectors[0].params",
            &lookup,
        )
        .expect("expanded");
        assert_eq!(
            Value::Object(expanded),
            json!({"token": "Bearer s3cret", "nested": {"list": ["42"]}, "n": 3})
        );
        let redactor = Redactor::new(secrets);
        assert_eq!(redactor.redact("got s3cret and 42"), "got *** and ***");
    }

    #[test]
    fn a_missing_variable_names_the_key() {
        let params = json!({"auth": {"token": "${MISSING_VAR}"}});
        let error = expand(
            params.as_object().expect("object"),
            "connectors[2].params",
            &|_| None,
        )
        .expect_err("missing");
        assert_eq!(
            error.to_string(),
            "connectors[2].params.auth.token: environment variable `MISSING_VAR` is not set"
        );
    }
}
