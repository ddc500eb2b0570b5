//! Timestamps: Eddy keeps them as milliseconds since the Unix epoch (UTC); these convert to and from
//! text (`YYYY-MM-DD HH:MM:SS[.fff]`, ISO 8601 with `T` and an offset, PostgreSQL's `timestamptz`).

use std::fmt::Write;

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Days in month `m` (1–12) of year `y` (proleptic Gregorian).
pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if is_leap(y) {
                29
            } else {
                28
            }
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The text of the two timestamps PostgreSQL calls `infinity` and `-infinity`, which Eddy keeps
/// as the largest and smallest milliseconds.
fn infinity(ms: i64) -> Option<&'static str> {
    match ms {
        i64::MAX => Some("infinity"),
        i64::MIN => Some("-infinity"),
        _ => None,
    }
}

/// Formats milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS[.fff]` (UTC). Years outside
/// 0000–9999 take a sign and six digits (ISO 8601's expanded years, e.g. `+010000-01-01`);
/// `i64::MAX` and `i64::MIN` are `infinity` and `-infinity`. [`parse_timestamp`] reads all of them.
pub fn format_timestamp(ms: i64) -> String {
    if let Some(text) = infinity(ms) {
        return text.to_string();
    }
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, frac) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    let mut out = String::with_capacity(23);
    if (0..=9999).contains(&y) {
        let _ = write!(out, "{y:04}");
    } else {
        let _ = write!(out, "{}{:06}", if y < 0 { '-' } else { '+' }, y.unsigned_abs());
    }
    let _ = write!(out, "-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}");
    if frac != 0 {
        let _ = write!(out, ".{frac:03}");
    }
    out
}

/// Parses `YYYY-MM-DD[( |T)HH:MM[:SS[.fff…]]][Z|UTC|±HH[:MM]]` into milliseconds since the epoch;
/// also an expanded year (`±YYYYYY-…`) and `±infinity`, as [`format_timestamp`] writes them.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    struct Cur<'a> {
        b: &'a [u8],
        i: usize,
    }
    impl Cur<'_> {
        fn num(&mut self, len: usize) -> Option<i64> {
            let part = self.b.get(self.i..self.i + len)?;
            if !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            self.i += len;
            Some(part.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')))
        }
        fn eat(&mut self, c: u8) -> bool {
            if self.b.get(self.i) == Some(&c) {
                self.i += 1;
                true
            } else {
                false
            }
        }
        fn done(&self) -> bool {
            self.i == self.b.len()
        }
    }
    match s.trim() {
        "infinity" | "+infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let mut c = Cur { b: s.trim().as_bytes(), i: 0 };
    let y = if c.eat(b'+') {
        c.num(6)?
    } else if c.eat(b'-') {
        -c.num(6)?
    } else {
        c.num(4)?
    };
    if !c.eat(b'-') {
        return None;
    }
    let mo = c.num(2)?;
    if !c.eat(b'-') {
        return None;
    }
    let d = c.num(2)?;
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return None;
    }
    let (mut h, mut mi, mut sec, mut ms) = (0, 0, 0, 0);
    if c.eat(b' ') || c.eat(b'T') || c.eat(b't') {
        h = c.num(2)?;
        if !c.eat(b':') {
            return None;
        }
        mi = c.num(2)?;
        if c.eat(b':') {
            sec = c.num(2)?;
            if c.eat(b'.') {
                let start = c.i;
                while c.b.get(c.i).is_some_and(u8::is_ascii_digit) {
                    c.i += 1;
                }
                let frac = &c.b[start..c.i];
                if frac.is_empty() {
                    return None;
                }
                ms = frac
                    .iter()
                    .chain(std::iter::repeat(&b'0'))
                    .take(3)
                    .fold(0, |acc, d| acc * 10 + i64::from(d - b'0'));
            }
        }
        if h > 23 || mi > 59 || sec > 59 {
            return None;
        }
    }
    // Optional zone: Z, UTC, or ±HH[:MM] / ±HHMM.
    let _ = c.eat(b' ');
    let mut offset_min = 0;
    let rest = &c.b[c.i..];
    if rest.eq_ignore_ascii_case(b"Z") || rest.eq_ignore_ascii_case(b"UTC") {
        c.i = c.b.len();
    } else if let Some(&sign @ (b'+' | b'-')) = rest.first() {
        c.i += 1;
        let sign = if sign == b'-' { -1 } else { 1 };
        let oh = c.num(2)?;
        let _ = c.eat(b':');
        let om = if c.done() { 0 } else { c.num(2)? };
        if oh > 23 || om > 59 {
            return None;
        }
        offset_min = sign * (oh * 60 + om);
    }
    if !c.done() {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let total = ((days.checked_mul(24)? + h) * 60 + mi - offset_min).checked_mul(60_000)?.checked_add(sec * 1000 + ms)?;
    // The two extremes stand for ±infinity; a date that lands on them is out of range.
    (infinity(total).is_none()).then_some(total)
}

/// Formats milliseconds since the epoch as ISO 8601 UTC: `YYYY-MM-DDTHH:MM:SS.fffZ`.
pub fn format_iso8601(ms: i64) -> String {
    if let Some(text) = infinity(ms) {
        return text.to_string();
    }
    let mut s = format_timestamp(ms);
    if !s.contains('.') {
        s.push_str(".000");
    }
    if let Some(space) = s.find(' ') {
        s.replace_range(space..space + 1, "T");
    }
    s.push('Z');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_timestamps() {
        assert_eq!(format_iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_iso8601(1_714_566_896_789), "2024-05-01T12:34:56.789Z");
        assert_eq!(format_iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_iso8601(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(parse_timestamp(&format_iso8601(1_714_566_896_789)), Some(1_714_566_896_789));
    }

    #[test]
    fn years_outside_0000_to_9999_and_infinity_round_trip() {
        // 10000-01-01, 0001-01-01 BC (year 0), 0002 BC (year -1), PostgreSQL's extremes.
        let cases = [
            (253_402_300_800_000, "+010000-01-01T00:00:00.000Z"),
            (-62_167_219_200_000, "0000-01-01T00:00:00.000Z"),
            (-62_167_219_200_001, "-000001-12-31T23:59:59.999Z"),
            (i64::MAX, "infinity"),
            (i64::MIN, "-infinity"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_iso8601(ms), text);
            assert_eq!(parse_timestamp(text), Some(ms), "{text}");
            assert_eq!(parse_timestamp(&format_timestamp(ms)), Some(ms), "{}", format_timestamp(ms));
        }
        // Far beyond what milliseconds hold: no value, not a wrapped one.
        let far = parse_timestamp("+999999-12-31T23:59:59Z").unwrap();
        assert_eq!(format_iso8601(far), "+999999-12-31T23:59:59.000Z");
        assert_eq!(parse_timestamp("+99999999-01-01"), None);
    }
}
