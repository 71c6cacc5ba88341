//! The one event contract: whatever event a producer builds, the engine decodes exactly that
//! event from its encoding (`decode(encode(e)) == e`), for every event type, with arbitrary
//! identifiers, amounts at full precision and times to the nanosecond.

use chrono::{DateTime, NaiveDate, Utc};
use kpi_model::event::{SpendCategory, MAX_IDENTIFIER_BYTES};
use kpi_model::money::Decimal;
use kpi_model::{decode_event, DecodeLimits, Event, EventData, Timestamp};
use proptest::prelude::*;

/// Any identifier the decoder accepts: 1 to 256 bytes of any characters but controls.
fn identifier() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.:-]{1,40}",
        "\\PC{1,60}",
        Just("\"quoted\" \\ back\\slash / é 🚀".to_string()),
    ]
    .prop_filter("within the limit", |text| {
        !text.is_empty() && text.len() <= MAX_IDENTIFIER_BYTES
    })
}

fn optional_identifier() -> impl Strategy<Value = Option<String>> {
    prop::option::of(identifier())
}

fn channel() -> impl Strategy<Value = Option<String>> {
    optional_identifier().prop_filter("`all` is reserved", |channel| {
        channel.as_deref() != Some("all")
    })
}

/// Amounts up to the maximum, with any number of decimal places a decimal keeps exactly.
fn amount() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        (0..=1_000_000_000_000i64, 0..=2u32).prop_map(|(units, scale)| Decimal::new(units, scale)),
        (0u64..=u64::MAX, 0..=28u32).prop_map(|(mantissa, scale)| {
            Decimal::from_i128_with_scale(i128::from(mantissa), scale)
        }),
        Just(Decimal::ZERO),
    ]
    .prop_filter("at most the maximum", |amount| {
        *amount <= kpi_model::money::MAX_AMOUNT
    })
}

fn currency() -> impl Strategy<Value = String> {
    "[A-Z]{3}"
}

fn date() -> impl Strategy<Value = NaiveDate> {
    (0..200_000i64).prop_map(|days| {
        NaiveDate::from_ymd_opt(1900, 1, 1).expect("a date") + chrono::Duration::days(days)
    })
}

fn category() -> impl Strategy<Value = SpendCategory> {
    prop_oneof![
        Just(SpendCategory::Media),
        Just(SpendCategory::Tools),
        Just(SpendCategory::Prospecting),
        Just(SpendCategory::Other),
    ]
}

fn data() -> impl Strategy<Value = EventData> {
    prop_oneof![
        (
            identifier(),
            channel(),
            optional_identifier(),
            prop::option::of(any::<bool>()),
            optional_identifier()
        )
            .prop_map(|(lead_id, channel, campaign, qualified, customer_id)| {
                EventData::LeadCreated {
                    lead_id,
                    channel,
                    campaign,
                    qualified,
                    customer_id,
                }
            }),
        (identifier(), any::<bool>())
            .prop_map(|(lead_id, qualified)| EventData::LeadQualified { lead_id, qualified }),
        (identifier(), identifier())
            .prop_map(|(lead_id, stage)| EventData::LeadStageChanged { lead_id, stage }),
        (
            identifier(),
            identifier(),
            amount(),
            currency(),
            optional_identifier(),
            channel(),
            optional_identifier()
        )
            .prop_map(
                |(deal_id, customer_id, amount, currency, lead_id, channel, campaign)| {
                    EventData::DealWon {
                        deal_id,
                        customer_id,
                        amount,
                        currency,
                        lead_id,
                        channel,
                        campaign,
                    }
                }
            ),
        (identifier(), optional_identifier())
            .prop_map(|(deal_id, lead_id)| EventData::DealLost { deal_id, lead_id }),
        (
            date(),
            amount(),
            currency(),
            channel(),
            optional_identifier(),
            category(),
            optional_identifier(),
            optional_identifier()
        )
            .prop_map(
                |(date, amount, currency, channel, campaign, category, source, account)| {
                    EventData::SpendReported {
                        date,
                        amount,
                        currency,
                        channel,
                        campaign,
                        category,
                        source,
                        account,
                    }
                }
            ),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        "[a-z0-9_-]{1,64}",
        identifier(),
        identifier(),
        // 1900 to 2200, to the nanosecond.
        (-2_208_988_800_000_000_000i64..7_258_118_400_000_000_000i64),
        data(),
    )
        .prop_map(|(tenant, id, source, nanos, data)| Event {
            tenant,
            id,
            source,
            time: Timestamp(nanos),
            data,
        })
}

fn far_future() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2261-01-01T00:00:00Z")
        .expect("valid")
        .with_timezone(&Utc)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_event_decodes_from_its_encoding_as_itself(event in event()) {
        let bytes = event.encode();
        let limits = DecodeLimits { max_event_bytes: usize::MAX, ..DecodeLimits::default() };
        let decoded = decode_event(&event.subject(), &bytes, far_future(), &limits);
        prop_assert_eq!(decoded.as_ref(), Ok(&event), "{}", String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn a_spend_lines_identity_reads_the_same_from_its_event(event in event()) {
        if let Some(key) = event.data.spend_line_key() {
            prop_assert_eq!(kpi_model::record::SpendLineKey::from_text(&key.to_text()), Some(key));
        }
    }
}
