//! Exact money: amounts are [`Decimal`]s from the JSON text, never binary floats, so ten spends
//! of 0.10 make exactly 1.00. Rounding happens only when a sum is shown (two decimals, half to
//! even).

use rust_decimal::prelude::ToPrimitive;
pub use rust_decimal::Decimal;
use rust_decimal::RoundingStrategy;

/// The largest amount one event may carry, in its own currency: one trillion (10^12).
///
/// With exchange rates bounded by [`MAX_FX_RATE`], one event adds at most 10^19 to a total,
/// and a 96-bit decimal holds more than 7.9 × 10^28: a total overflows only after some eight
/// billion events of the maximum amount in one tenant and period. The aggregates still use
/// saturating additions, so even that history could not stop the engine.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// The largest configured exchange rate (`fx`): ten million reporting-currency units for one
/// unit of the other currency.
pub const MAX_FX_RATE: Decimal = Decimal::from_parts(10_000_000, 0, 0, false, 0);

/// The most significant digits, and decimal places, an amount may have: what a 96-bit decimal
/// holds exactly. An amount that needs more is rejected, never rounded.
pub const MAX_AMOUNT_DIGITS: usize = 28;

/// Why a decimal text is not an acceptable amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmountError {
    /// Not a decimal in plain or scientific notation.
    NotADecimal,
    /// More than [`MAX_AMOUNT_DIGITS`] significant digits or decimal places: it cannot be kept
    /// exactly.
    TooPrecise,
    /// Above [`MAX_AMOUNT`].
    TooLarge,
    /// Below zero.
    Negative,
}

impl std::fmt::Display for AmountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmountError::NotADecimal => f.write_str("expected a decimal as a string or number"),
            AmountError::TooPrecise => write!(
                f,
                "more than {MAX_AMOUNT_DIGITS} significant digits or decimal places cannot be kept exactly"
            ),
            AmountError::TooLarge => write!(f, "above the maximum amount of {MAX_AMOUNT}"),
            AmountError::Negative => f.write_str("is negative"),
        }
    }
}

/// Parses the raw JSON text of an amount: a JSON string (`"12.50"`) or a JSON number (`12.5`,
/// `1e3`), read from its digits so no precision is lost on the way.
pub fn parse_amount_json(raw: &str) -> Result<Decimal, AmountError> {
    let raw = raw.trim();
    let text = if let Some(inner) = raw.strip_prefix('"') {
        inner
            .strip_suffix('"')
            .ok_or(AmountError::NotADecimal)?
            .trim()
    } else {
        raw
    };
    parse_amount_text(text)
}

/// Parses a non-negative amount written in plain or scientific notation, exactly: trailing
/// zeros aside, every digit written is kept, or the text is refused.
pub fn parse_amount_text(text: &str) -> Result<Decimal, AmountError> {
    let value = parse_decimal_exact(text)?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(AmountError::Negative);
    }
    if value > MAX_AMOUNT {
        return Err(AmountError::TooLarge);
    }
    Ok(value.abs())
}

/// A decimal in plain (`-12.50`) or scientific (`1.25e-3`) notation, exactly, with at most
/// [`MAX_AMOUNT_DIGITS`] significant digits and decimal places once trailing zeros are
/// dropped.
pub fn parse_decimal_exact(text: &str) -> Result<Decimal, AmountError> {
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(AmountError::NotADecimal);
            }
            let exponent: i64 = exponent.parse().map_err(|_| AmountError::NotADecimal)?;
            (mantissa, exponent)
        }
        None => (unsigned, 0),
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if integer.is_empty() && fraction.is_empty()
        || !integer.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(AmountError::NotADecimal);
    }
    // value = digits × 10^-scale
    let digits = format!("{integer}{fraction}");
    let mut scale = fraction.len() as i64 - exponent;
    let mut digits = digits.trim_start_matches('0').to_string();
    while scale > 0 && digits.ends_with('0') {
        digits.pop();
        scale -= 1;
    }
    if digits.is_empty() {
        return Ok(Decimal::ZERO);
    }
    if scale < 0 {
        // An integer written with an exponent: past the maximum long before 28 zeros.
        if digits.len() as i64 - scale > MAX_AMOUNT_DIGITS as i64 {
            return Err(AmountError::TooLarge);
        }
        digits.push_str(&"0".repeat((-scale) as usize));
        scale = 0;
    }
    if digits.len() > MAX_AMOUNT_DIGITS || scale > MAX_AMOUNT_DIGITS as i64 {
        return Err(if digits.len() as i64 - scale > 13 {
            AmountError::TooLarge
        } else {
            AmountError::TooPrecise
        });
    }
    let mantissa: i128 = digits.parse().map_err(|_| AmountError::NotADecimal)?;
    let value = Decimal::try_from_i128_with_scale(
        if negative { -mantissa } else { mantissa },
        scale as u32,
    )
    .map_err(|_| AmountError::TooPrecise)?;
    Ok(value)
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
    parse_decimal_exact(&format!("{value}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn ten_spends_of_ten_cents_make_exactly_one() {
        let dime = parse_amount_json("0.1").expect("number");
        let total: Decimal = std::iter::repeat_n(dime, 10).sum();
        assert_eq!(format_money(total), "1.00");
        assert_eq!(total, Decimal::ONE);
    }

    fn decimal(text: &str) -> Decimal {
        Decimal::from_str(text).expect("a decimal")
    }

    #[test]
    fn amounts_read_from_strings_numbers_and_exponents() {
        assert_eq!(parse_amount_json("\"1250.00\""), Ok(decimal("1250")));
        assert_eq!(parse_amount_json("12.5"), Ok(decimal("12.5")));
        assert_eq!(parse_amount_json("1e3"), Ok(decimal("1000")));
        assert_eq!(parse_amount_json("1.25E-2"), Ok(decimal("0.0125")));
        assert_eq!(parse_amount_json("\"+7\""), Ok(decimal("7")));
        assert_eq!(parse_amount_json("-0"), Ok(Decimal::ZERO));
        for bad in [
            "\"abc\"",
            "true",
            "\"\"",
            "\"1.2.3\"",
            "1e",
            "\"0x10\"",
            "1e1000000",
            "\"12",
        ] {
            assert_eq!(
                parse_amount_json(bad),
                Err(AmountError::NotADecimal),
                "{bad}"
            );
        }
        assert_eq!(parse_amount_json("-5"), Err(AmountError::Negative));
    }

    #[test]
    fn every_digit_is_kept_or_the_amount_is_refused() {
        // 18 significant digits: kept, not turned into the float 0.125.
        assert_eq!(
            parse_amount_json("0.125000000000000001").map(|d| d.to_string()),
            Ok("0.125000000000000001".to_string())
        );
        // Trailing zeros are not digits that need keeping.
        assert_eq!(
            parse_amount_json("\"0.1250000000000000000000000000000000\""),
            Ok(decimal("0.125"))
        );
        // 28 decimal places fit; 29 would be rounded, so they are refused.
        assert_eq!(
            parse_amount_json("0.0000000000000000000000000001"),
            Ok(decimal("0.0000000000000000000000000001"))
        );
        assert_eq!(
            parse_amount_json("0.00000000000000000000000000011"),
            Err(AmountError::TooPrecise)
        );
        assert_eq!(parse_amount_json("1e-29"), Err(AmountError::TooPrecise));
        assert_eq!(
            parse_amount_json("123456789012.1234567890123456"),
            Ok(decimal("123456789012.1234567890123456"))
        );
        assert_eq!(
            parse_amount_json("123456789012.12345678901234567"),
            Err(AmountError::TooPrecise)
        );
    }

    #[test]
    fn amounts_above_the_maximum_are_refused() {
        assert_eq!(MAX_AMOUNT, decimal("1000000000000"));
        assert_eq!(MAX_FX_RATE, decimal("10000000"));
        assert_eq!(parse_amount_json("1000000000000"), Ok(MAX_AMOUNT));
        assert_eq!(parse_amount_json("1e12"), Ok(MAX_AMOUNT));
        for big in [
            "1000000000000.01",
            "1e13",
            "\"50000000000000000000000000000\"",
            "9e99999",
        ] {
            assert_eq!(parse_amount_json(big), Err(AmountError::TooLarge), "{big}");
        }
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
