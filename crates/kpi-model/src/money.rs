//! Exact money: amounts are [`Decimal`]s from the JSON text, never binary floats, so ten spends
//! of 0.10 make exactly 1.00. Rounding happens only when a sum is shown (two decimals, half to
//! even).

use std::str::FromStr;

use rust_decimal::prelude::ToPrimitive;
pub use rust_decimal::Decimal;
use rust_decimal::RoundingStrategy;

/// Parses the raw JSON text of an amount: a JSON string (`"12.50"`) or a JSON number (`12.5`,
/// `1e3`), read from its digits so no precision is lost on the way.
pub fn parse_amount_json(raw: &str) -> Option<Decimal> {
    let raw = raw.trim();
    let text = if let Some(inner) = raw.strip_prefix('"') {
        inner.strip_suffix('"')?.trim()
    } else {
        raw
    };
    parse_amount_text(text)
}

/// Parses a decimal written in plain or scientific notation.
pub fn parse_amount_text(text: &str) -> Option<Decimal> {
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return None;
    }
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str(text).ok()
    }
}

/// Rounds to cents (half to even, as accountants and Python's `Decimal.quantize` do) and prints
/// with exactly two decimals.
pub fn format_money(amount: Decimal) -> String {
    let rounded = amount.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    format!("{rounded:.2}")
}

/// The nearest binary float, for ratios (which are reported as JSON numbers).
pub fn to_f64(amount: Decimal) -> f64 {
    amount.to_f64().unwrap_or(f64::NAN)
}

/// Converts a configured rate given as a TOML float to the decimal the user wrote: Rust prints
/// the shortest text that reads back as the same float, so `0.92` becomes exactly `0.92`.
pub fn decimal_from_config_float(value: f64) -> Option<Decimal> {
    if !value.is_finite() {
        return None;
    }
    parse_amount_text(&format!("{value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_spends_of_ten_cents_make_exactly_one() {
        let dime = parse_amount_json("0.1").expect("number");
        let total: Decimal = std::iter::repeat_n(dime, 10).sum();
        assert_eq!(format_money(total), "1.00");
        assert_eq!(total, Decimal::ONE);
    }

    #[test]
    fn amounts_read_from_strings_numbers_and_exponents() {
        assert_eq!(
            parse_amount_json("\"1250.00\""),
            Decimal::from_str("1250").ok()
        );
        assert_eq!(parse_amount_json("12.5"), Decimal::from_str("12.5").ok());
        assert_eq!(parse_amount_json("1e3"), Decimal::from_str("1000").ok());
        assert_eq!(parse_amount_json("\"abc\""), None);
        assert_eq!(parse_amount_json("true"), None);
        assert_eq!(parse_amount_json("\"\""), None);
    }

    #[test]
    fn money_rounds_half_to_even() {
        assert_eq!(format_money(Decimal::from_str("2.345").expect("d")), "2.34");
        assert_eq!(format_money(Decimal::from_str("2.355").expect("d")), "2.36");
        assert_eq!(format_money(Decimal::from(5000)), "5000.00");
    }

    #[test]
    fn config_floats_keep_the_written_digits() {
        assert_eq!(
            decimal_from_config_float(0.92),
            Decimal::from_str("0.92").ok()
        );
        assert_eq!(
            decimal_from_config_float(1.17),
            Decimal::from_str("1.17").ok()
        );
        assert_eq!(decimal_from_config_float(f64::NAN), None);
    }
}
