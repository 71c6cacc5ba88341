//! The streams the engine reads and writes, created when absent.

use std::time::Duration;

use crate::{js_error, IngestError};
use async_nats::jetstream::{self, stream};
use kpi_config::Config;
use kpi_model::event::REJECTED_SUBJECT_PREFIX;

/// Creates the event and dead-letter streams when absent (never deletes or changes them), for
/// one engine or, with `[cluster]`, for several.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, IngestError> {
    if config.cluster.enabled {
        ensure_partitioned_streams(js, config).await
    } else {
        ensure_single_streams(js, config).await
    }
}

/// One engine's streams: the event stream unpartitioned, as SPEC section 4 has it.
async fn ensure_single_streams(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, IngestError> {
    let duplicate_window = Duration::from_secs(config.nats.duplicate_window_s);
    let events = js
        .get_or_create_stream(stream::Config {
            name: config.nats.stream.clone(),
            subjects: vec!["kpi.events.>".to_string()],
            storage: stream::StorageType::File,
            duplicate_window,
            num_replicas: config.nats.replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    if events.cached_info().config.subject_transform.is_some() {
        return Err(IngestError::Cluster(format!(
            "nats.stream: `{}` is partitioned for several engines (multi-engine mode set it up): run this engine with the others' [cluster] settings (cluster.enabled = true)",
            config.nats.stream
        )));
    }
    ensure_rejected_stream(js, config).await?;
    Ok(events)
}

/// Creates the dead-letter stream when absent.
async fn ensure_rejected_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<(), IngestError> {
    let duplicate_window = Duration::from_secs(config.nats.duplicate_window_s);
    js.get_or_create_stream(stream::Config {
        name: config.nats.rejected_stream.clone(),
        subjects: vec![format!("{REJECTED_SUBJECT_PREFIX}>")],
        storage: stream::StorageType::File,
        duplicate_window,
        num_replicas: config.nats.replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(js_error)?;
    Ok(())
}

/// The subjects of the partitioned event stream: every event subject with a tenant token.
pub const PARTITIONED_SUBJECTS: &str = "kpi.events.*.>";

/// The subject transform of the partitioned stream: `kpi.events.<tenant>.<type>` is stored as
/// `<partition>.kpi.events.<tenant>.<type>`, the partition computed by the server.
pub fn partition_transform(partitions: u32) -> stream::SubjectTransform {
    stream::SubjectTransform {
        source: PARTITIONED_SUBJECTS.to_string(),
        destination: format!("{{{{partition({partitions},1)}}}}.kpi.events.{{{{wildcard(1)}}}}.>"),
    }
}

/// The number of partitions a transform destination names, if it is one of ours.
fn transform_partitions(transform: &stream::SubjectTransform) -> Option<u32> {
    let destination = transform.destination.replace(' ', "").to_lowercase();
    let rest = destination.strip_prefix("{{partition(")?;
    let (count, rest) = rest.split_once(',')?;
    rest.starts_with("1)}}.kpi.events.")
        .then(|| count.parse().ok())
        .flatten()
}

/// `major.minor` of a server version such as `2.15.1` or `2.11.0-RC.1`.
pub fn server_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The version of the server `js` is connected to, refused when older than 2.11.
pub(crate) async fn require_cluster_server(
    js: &jetstream::Context,
    config: &Config,
) -> Result<String, IngestError> {
    // A client connects in the background: the server's version is known once connected.
    let mut info = js.client().server_info();
    let waited = std::time::Instant::now();
    while info.version.is_empty() {
        if waited.elapsed() > Duration::from_secs(30) {
            return Err(IngestError::JetStream("not connected to NATS yet".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = js.client().server_info();
    }
    let version = info.version.clone();
    if server_version(&version).is_none_or(|v| v < (2, 11)) {
        return Err(IngestError::Cluster(format!(
            "cluster.enabled: multi-engine mode needs nats-server 2.11 or later (priority groups, subject transforms and the fixes it relies on); `{}` ({}) runs {version}",
            info.server_name, config.nats.url
        )));
    }
    Ok(version)
}

/// Multi-engine mode's streams: refuses a server older than 2.11, creates the partitioned
/// event stream when absent and reads back the transform the server stored (an older server
/// drops what it does not know without a word).
pub async fn ensure_partitioned_streams(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, IngestError> {
    let version = require_cluster_server(js, config).await?;
    let partitions = config.cluster.partitions;
    let name = &config.nats.stream;
    let events = match js.get_stream(name).await {
        Ok(mut events) => {
            let info = events.info().await.map_err(js_error)?.clone();
            match &info.config.subject_transform {
                None if info.state.messages == 0 => {
                    let mut updated = info.config.clone();
                    updated.subjects = vec![PARTITIONED_SUBJECTS.to_string()];
                    updated.subject_transform = Some(partition_transform(partitions));
                    js.update_stream(&updated).await.map_err(js_error)?;
                    js.get_stream(name).await.map_err(js_error)?
                }
                None => {
                    return Err(IngestError::Cluster(format!(
                        "nats.stream: `{name}` holds {} events of a single engine, not partitioned: stop the engine and run `kpi cluster migrate` once (README, \"Moving to several engines\")",
                        info.state.messages
                    )))
                }
                Some(_) => events,
            }
        }
        Err(_) => js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![PARTITIONED_SUBJECTS.to_string()],
                subject_transform: Some(partition_transform(partitions)),
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(config.nats.duplicate_window_s),
                num_replicas: config.nats.replicas.max(1),
                description: Some("KPI events, partitioned by tenant".into()),
                ..Default::default()
            })
            .await
            .map_err(js_error)?,
    };
    check_partitioned(&events.cached_info().config, config, &version)?;
    ensure_rejected_stream(js, config).await?;
    Ok(events)
}

/// Refuses an event stream whose stored settings are not those multi-engine mode relies on.
pub(crate) fn check_partitioned(
    stored: &stream::Config,
    config: &Config,
    version: &str,
) -> Result<(), IngestError> {
    let name = &config.nats.stream;
    let Some(transform) = &stored.subject_transform else {
        return Err(IngestError::Cluster(format!(
            "nats.stream: nats-server {version} did not keep the subject_transform of `{name}` (it needs 2.10, and multi-engine mode 2.11 or later)"
        )));
    };
    match transform_partitions(transform) {
        Some(partitions) if partitions == config.cluster.partitions => Ok(()),
        Some(partitions) => Err(IngestError::Cluster(format!(
            "cluster.partitions: this engine has {} but the stream `{name}` is partitioned into {partitions}; every engine needs the stream's number (changing it means a new stream and a rebuild)",
            config.cluster.partitions
        ))),
        None => Err(IngestError::Cluster(format!(
            "nats.stream: `{name}` has the subject transform `{}` → `{}`, not the engine's partitioning",
            transform.source, transform.destination
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transform_names_its_partitions_and_versions_compare() {
        let transform = partition_transform(64);
        assert_eq!(
            transform.destination,
            "{{partition(64,1)}}.kpi.events.{{wildcard(1)}}.>"
        );
        assert_eq!(transform_partitions(&transform), Some(64));
        let other = stream::SubjectTransform {
            source: "kpi.events.>".into(),
            destination: "x.>".into(),
        };
        assert_eq!(transform_partitions(&other), None);
        assert_eq!(server_version("2.15.1"), Some((2, 15)));
        assert_eq!(server_version("2.11.0-RC.1"), Some((2, 11)));
        assert!(server_version("2.9.10").is_some_and(|v| v < (2, 11)));
        assert_eq!(server_version("nonsense"), None);
    }
}
