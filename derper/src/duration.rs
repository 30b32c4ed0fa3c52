//! Go duration strings (`time.ParseDuration`'s grammar), the one parser for every duration
//! flag and field in the workspace: the `derpprobe` flags, the operator's flags and its
//! DerpRegion fields (`certificate.validity`, `rotateBefore`, `derpMap.unhealthyAfter`).
//!
//! Grammar (Go's): an optional sign, then one or more `<number><unit>` pairs, where the
//! number is decimal with an optional fraction (`1.5`, `.5`, `5.`) and the unit is one of
//! `ns`, `us`, `µs` (U+00B5), `μs` (U+03BC), `ms`, `s`, `m`, `h`; or the bare string `0`.
//! A unit is required everywhere else (`10` is an error). Values above Go's `Duration` range
//! (2^63−1 ns, about 292 years) are errors, as in Go. Go allows negative durations; a
//! [`std::time::Duration`] cannot hold one, so a negative non-zero value is an error here.
//!
//! Also here: [`fmt_duration`], the short form durations take in messages.
//!
//! Does not own: what a zero or very long value means for a given flag (callers check).

use std::time::Duration;

/// Why a string is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty, a number without digits, or a stray character.
    #[error("invalid duration {0:?}")]
    Invalid(String),
    /// A number with no unit after it.
    #[error("missing unit in duration {0:?} (units: ns, us, ms, s, m, h)")]
    MissingUnit(String),
    /// A unit Go does not know (e.g. `d`).
    #[error("unknown unit {unit:?} in duration {input:?} (units: ns, us, ms, s, m, h)")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole input.
        input: String,
    },
    /// More than Go's `Duration` holds (2^63−1 ns).
    #[error("duration {0:?} is out of range (at most about 292 years)")]
    Overflow(String),
    /// A negative, non-zero duration.
    #[error("duration {0:?} is negative")]
    Negative(String),
}

/// Nanoseconds per unit (Go's `unitMap`).
fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Go's largest `Duration`, in nanoseconds.
const MAX_NANOS: u64 = i64::MAX as u64;

/// Parses a Go duration string (`0`, `500ms`, `1.5s`, `1h30m`, `87600h`).
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());
    let overflow = || DurationError::Overflow(input.to_owned());
    let (negative, mut rest) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        // <digits>[.<digits>]: at least one digit on either side of the point.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(input.to_owned()));
        }
        let per = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.to_owned(),
            input: input.to_owned(),
        })?;
        let whole = if int_part.is_empty() {
            0
        } else {
            int_part.parse::<u64>().map_err(|_| overflow())?
        };
        let mut nanos = whole.checked_mul(per).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            // Digits beyond what a u64 holds cannot change the result by a nanosecond.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac = digits.parse::<u64>().map_err(|_| invalid())?;
            let scale = 10f64.powi(i32::try_from(digits.len()).map_err(|_| invalid())?);
            // As Go does: f64 keeps fractions of an hour nanosecond-accurate.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let part = (frac as f64 * (per as f64 / scale)) as u64;
            nanos = nanos.checked_add(part).ok_or_else(overflow)?;
        }
        total = total.checked_add(nanos).ok_or_else(overflow)?;
        if total > MAX_NANOS {
            return Err(overflow());
        }
        rest = after;
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(input.to_owned()));
    }
    Ok(Duration::from_nanos(total))
}

/// Formats a duration for human messages (`250ms`, `3s`, `1.5s`): whole seconds, whole
/// milliseconds below a second, else seconds to one decimal. Not Go's `Duration.String`.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_go_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn accepts_every_form_go_accepts() {
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("+0"), Duration::ZERO);
        assert_eq!(ok("-0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("-0s"), Duration::ZERO);
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("+5s"), Duration::from_secs(5));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10m"), Duration::from_secs(600));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1h30m10s"), Duration::from_secs(5410));
        assert_eq!(ok("87600h"), Duration::from_secs(87600 * 3600));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("5.s"), Duration::from_secs(5));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("1.0000000001h"), Duration::from_nanos(3_600_000_000_360));
        assert_eq!(ok("3ns"), Duration::from_nanos(3));
        assert_eq!(ok("3us"), Duration::from_micros(3));
        assert_eq!(ok("3µs"), Duration::from_micros(3));
        assert_eq!(ok("3μs"), Duration::from_micros(3));
        assert_eq!(
            ok("1h1m1s1ms1us1ns"),
            Duration::from_nanos(3_661_001_001_001)
        );
        // repeated and unordered units add up, as in Go
        assert_eq!(ok("1s1s"), Duration::from_secs(2));
        assert_eq!(ok("1m1h"), Duration::from_secs(3660));
        // Go's largest Duration
        assert_eq!(ok("9223372036854775807ns"), Duration::from_nanos(MAX_NANOS));
        assert_eq!(
            ok("2562047h47m16.854775807s"),
            Duration::from_nanos(MAX_NANOS)
        );
    }

    #[test]
    fn rejects_what_go_rejects() {
        for s in [
            "", "+", "-", ".", ".s", "s", "10", "1.5", "5x", "10d", "1h 30m", " 5s", "5s ", "1e3s",
            "--5s", "0x10s",
        ] {
            assert!(parse_go_duration(s).is_err(), "{s:?} must be an error");
        }
        assert_eq!(
            parse_go_duration("10"),
            Err(DurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_go_duration("10d"),
            Err(DurationError::UnknownUnit {
                unit: "d".into(),
                input: "10d".into()
            })
        );
    }

    #[test]
    fn out_of_range_and_negative_are_errors() {
        assert_eq!(
            parse_go_duration("9223372036854775808ns"),
            Err(DurationError::Overflow("9223372036854775808ns".into()))
        );
        assert!(matches!(
            parse_go_duration("2562048h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_go_duration("99999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert_eq!(
            parse_go_duration("-5s"),
            Err(DurationError::Negative("-5s".into()))
        );
    }

    #[test]
    fn errors_name_the_input() {
        let e = parse_go_duration("5x").unwrap_err().to_string();
        assert!(e.contains("\"5x\"") && e.contains("\"x\""), "{e}");
    }

    #[test]
    fn messages_use_the_short_form() {
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_secs(3)), "3s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::ZERO), "0ms");
        // what the short form prints parses back to the same duration
        for d in [250, 3000, 1500, 90_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_go_duration(&fmt_duration(d)), Ok(d));
        }
    }
}
