//! Dead letters: how a rejected message is republished to `kpi.rejected.<tenant>`.
//!
//! A dead letter must always be publishable, whatever the message that caused it, or the
//! engine would retry it forever and consume nothing after it. So:
//!
//! - header values never carry a CR or LF (NATS would refuse them): the rejection detail
//!   quotes values with control characters escaped (see `kpi_model::event::shown`), and every
//!   header value is checked again here;
//! - the copy fits the server's `max_payload` and the dead-letter stream's `max_msg_size`
//!   once the headers are added: a payload too large is cut, and `Kpi-Truncated` gives its
//!   original size. `Kpi-Original-Sequence` always names the original in `KPI_EVENTS`, where
//!   the whole message stays.

use async_nats::HeaderMap;
use bytes::Bytes;
use kpi_model::event::REJECTED_SUBJECT_PREFIX;
use kpi_model::Rejection;

/// Header carrying the reason of a dead letter.
pub const REJECT_REASON_HEADER: &str = "Kpi-Reject-Reason";
/// Header carrying the subject a dead letter was first published to.
pub const ORIGINAL_SUBJECT_HEADER: &str = "Kpi-Original-Subject";
/// Header carrying the stream sequence of the original message in the events stream.
pub const ORIGINAL_SEQUENCE_HEADER: &str = "Kpi-Original-Sequence";
/// Header present when the copy was cut to fit: the original payload's size in bytes.
pub const TRUNCATED_HEADER: &str = "Kpi-Truncated";

/// Longest header value written (the reason's detail is cut, not the message).
const MAX_HEADER_VALUE_BYTES: usize = 1024;
/// Room kept for what the client adds to a message beyond headers and payload.
const SAFETY_MARGIN_BYTES: usize = 256;

/// A dead letter ready to publish.
#[derive(Debug)]
pub struct DeadLetter {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// A header value that NATS accepts: control characters escaped, at most 1 KiB.
fn header_value(text: &str) -> String {
    let mut value = String::with_capacity(text.len().min(MAX_HEADER_VALUE_BYTES));
    for character in text.chars() {
        let escaped: String = if character.is_control() {
            character.escape_debug().collect()
        } else {
            character.to_string()
        };
        if value.len() + escaped.len() > MAX_HEADER_VALUE_BYTES - 3 {
            value.push_str("...");
            break;
        }
        value.push_str(&escaped);
    }
    value
}

/// Bytes the headers take on the wire (`NATS/1.0\r\n`, each `name: value\r\n`, `\r\n`).
fn headers_wire_len(headers: &[(&str, String)]) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, value)| name.len() + 2 + value.len() + 2)
        .sum();
    b"NATS/1.0\r\n".len() + lines + 2
}

/// The dead letter of the message at `stream_sequence` of `stream` (first published to
/// `subject`), for `tenant`, fitting in `max_message_bytes` (headers and payload).
pub fn dead_letter(
    stream: &str,
    stream_sequence: u64,
    subject: &str,
    payload: &Bytes,
    tenant: &str,
    rejection: &Rejection,
    max_message_bytes: usize,
) -> DeadLetter {
    let mut headers: Vec<(&str, String)> = vec![
        (REJECT_REASON_HEADER, header_value(&rejection.to_string())),
        (ORIGINAL_SUBJECT_HEADER, header_value(subject)),
        (ORIGINAL_SEQUENCE_HEADER, stream_sequence.to_string()),
        (
            "Nats-Msg-Id",
            header_value(&format!("kpi-rejected-{stream}-{stream_sequence}")),
        ),
    ];
    let budget = |headers: &[(&str, String)]| {
        max_message_bytes.saturating_sub(headers_wire_len(headers) + SAFETY_MARGIN_BYTES)
    };
    let payload = if payload.len() > budget(&headers) {
        headers.push((TRUNCATED_HEADER, payload.len().to_string()));
        payload.slice(..budget(&headers))
    } else {
        payload.clone()
    };
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        // Every value was made safe above: this cannot panic.
        map.insert(name, value.as_str());
    }
    DeadLetter {
        subject: format!("{REJECTED_SUBJECT_PREFIX}{tenant}"),
        headers: map,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpi_model::RejectReason;

    fn rejection(detail: &str) -> Rejection {
        Rejection::new(RejectReason::InvalidField, detail)
    }

    #[test]
    fn header_values_never_carry_a_line_break() {
        let letter = dead_letter(
            "KPI_EVENTS",
            7,
            "kpi.events.acme.lead.created",
            &Bytes::from_static(b"{}"),
            "acme",
            &rejection("time: `x\r\ny` is not an RFC 3339 time"),
            1024 * 1024,
        );
        let reason = letter
            .headers
            .get(REJECT_REASON_HEADER)
            .expect("reason")
            .as_str();
        assert_eq!(
            reason,
            "invalid_field: time: `x\\r\\ny` is not an RFC 3339 time"
        );
        assert_eq!(
            letter
                .headers
                .get(ORIGINAL_SEQUENCE_HEADER)
                .map(|v| v.as_str()),
            Some("7")
        );
        assert_eq!(letter.subject, "kpi.rejected.acme");
        assert!(letter.headers.get(TRUNCATED_HEADER).is_none());
        assert_eq!(letter.payload.as_ref(), b"{}");
    }

    #[test]
    fn a_long_reason_is_cut_not_the_letter() {
        let letter = dead_letter(
            "KPI_EVENTS",
            1,
            "kpi.events.acme.lead.created",
            &Bytes::from_static(b"{}"),
            "acme",
            &rejection(&"x".repeat(100_000)),
            1024 * 1024,
        );
        let reason = letter.headers.get(REJECT_REASON_HEADER).expect("reason");
        assert!(reason.as_str().len() <= MAX_HEADER_VALUE_BYTES);
        assert!(reason.as_str().ends_with("..."));
    }

    #[test]
    fn a_message_of_the_maximum_size_is_cut_to_fit_with_its_headers() {
        let max = 1024 * 1024;
        let payload = Bytes::from(vec![b'a'; max]);
        let letter = dead_letter(
            "KPI_EVENTS",
            42,
            "kpi.events.acme.lead.created",
            &payload,
            "acme",
            &rejection("payload of 1048576 bytes is over the maximum of 65536 bytes"),
            max,
        );
        assert_eq!(
            letter.headers.get(TRUNCATED_HEADER).map(|v| v.as_str()),
            Some("1048576")
        );
        let headers: Vec<(&str, String)> = letter
            .headers
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |value| (name.as_ref(), value.as_str().to_string()))
            })
            .collect();
        let total = headers_wire_len(&headers) + letter.payload.len();
        assert!(total + SAFETY_MARGIN_BYTES <= max, "{total}");
        assert!(
            letter.payload.len() > max - 2048,
            "{}",
            letter.payload.len()
        );
        assert!(letter.payload.iter().all(|b| *b == b'a'));
    }
}
