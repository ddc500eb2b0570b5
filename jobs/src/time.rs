//! Time, in one place: Eddy keeps timestamps as milliseconds since the Unix epoch (UTC); these
//! convert them to and from text (`YYYY-MM-DD HH:MM:SS[.fff]`, ISO 8601 with `T` and an offset), read
//! PostgreSQL's text output exactly ([`parse_postgres_timestamp`]: BC years, offsets with seconds,
//! `±infinity`) and read durations (`5s`).

use std::fmt::Write;
use std::time::Duration;

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
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
    // An expanded year (signed) has at least 6 digits, and as many as a timestamp's range needs
    // (years up to about 292 million): every timestamp formatted reads back.
    let expanded = |c: &mut Cur| {
        let digits = c.b[c.i..].iter().take_while(|b| b.is_ascii_digit()).count();
        (6..=9).contains(&digits).then(|| c.num(digits)).flatten()
    };
    let y = if c.eat(b'+') {
        expanded(&mut c)?
    } else if c.eat(b'-') {
        -expanded(&mut c)?
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
                ms = frac.iter().chain(std::iter::repeat(&b'0')).take(3).fold(0, |acc, d| acc * 10 + i64::from(d - b'0'));
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
    // In i128: a day's start may lie beyond the range of a time late in that day.
    let of_day = (((h * 60 + mi - offset_min) * 60 + sec) * 1000) + ms;
    let total = i64::try_from(i128::from(days).checked_mul(86_400_000)? + i128::from(of_day)).ok()?;
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

/// Parses a duration such as `500ms`, `5s`, `10m`, `1h` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("bad duration `{text}`: expected a whole number and a unit (ms, s, m, h), e.g. `5s`"))?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" | "sec" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("bad duration `{text}`: unknown unit `{}`; use ms, s, m or h, e.g. `5s`", unit.trim())),
    };
    n.checked_mul(scale).ok_or_else(|| format!("bad duration `{text}`: too large"))
}

/// Parses a duration such as `500ms`, `5s`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_ms(text).map(|ms| Duration::from_millis(ms.unsigned_abs()))
}

/// A spec's duration options are read with the spec (`#[serde(with = "crate::time::duration")]`):
/// what runs a connector holds a [`Duration`] and never parses text, and a bad one is refused at
/// submit time with the option named.
pub mod duration {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer};

    /// Reads a duration from its text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::parse_duration(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    /// An optional duration option.
    pub mod option {
        use super::*;

        /// Reads an optional duration from its text.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?.map(|t| super::super::parse_duration(&t)).transpose().map_err(D::Error::custom)
        }
    }
}

/// Milliseconds since the Unix epoch of PostgreSQL's ISO text for `timestamptz`, `timestamp` (no
/// offset: UTC) or `date`: `YYYY-MM-DD[ HH:MM:SS[.f…]][±HH[:MM[:SS]]][ BC]`, or `±infinity`.
/// Fractions of a millisecond are dropped (rounded towards the past).
pub fn parse_postgres_timestamp(text: &str) -> std::result::Result<i64, String> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let bad = || format!("`{text}` is not a timestamp like `2024-05-01 12:34:56.789+00`");
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    let mut p = Scan { s: body.as_bytes(), i: 0 };
    let year = p.digits(4, 9).ok_or_else(bad)?;
    let year = if bc { 1 - year } else { year };
    p.expect(b'-').ok_or_else(bad)?;
    let month = p.digits(2, 2).ok_or_else(bad)?;
    p.expect(b'-').ok_or_else(bad)?;
    let day = p.digits(2, 2).ok_or_else(bad)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad());
    }
    let (mut hour, mut minute, mut second, mut nanos) = (0, 0, 0, 0);
    if p.expect(b' ').or_else(|| p.expect(b'T')).is_some() {
        hour = p.digits(2, 2).ok_or_else(bad)?;
        p.expect(b':').ok_or_else(bad)?;
        minute = p.digits(2, 2).ok_or_else(bad)?;
        p.expect(b':').ok_or_else(bad)?;
        second = p.digits(2, 2).ok_or_else(bad)?;
        if p.expect(b'.').is_some() {
            let start = p.i;
            let fraction = p.digits(1, 9).ok_or_else(bad)?;
            nanos = fraction * 10i64.pow(9 - (p.i - start) as u32);
        }
        if hour > 24 || minute > 59 || second > 60 {
            return Err(bad());
        }
    }
    let mut offset = 0;
    let sign = match p.s.get(p.i) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => 0,
    };
    if sign != 0 {
        p.i += 1;
        let hours = p.digits(2, 2).ok_or_else(bad)?;
        let mut minutes = 0;
        let mut seconds = 0;
        if p.expect(b':').is_some() {
            minutes = p.digits(2, 2).ok_or_else(bad)?;
            if p.expect(b':').is_some() {
                seconds = p.digits(2, 2).ok_or_else(bad)?;
            }
        }
        offset = sign * (hours * 3600 + minutes * 60 + seconds);
    }
    if p.i != p.s.len() {
        return Err(bad());
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    seconds.checked_mul(1000).and_then(|ms| ms.checked_add(nanos / 1_000_000)).ok_or_else(bad)
}

/// A cursor over ASCII text.
struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    /// `min..=max` decimal digits (as many as there are, up to `max`).
    fn digits(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.i;
        let mut value: i64 = 0;
        while self.i < self.s.len() && self.i - start < max && self.s[self.i].is_ascii_digit() {
            value = value * 10 + i64::from(self.s[self.i] - b'0');
            self.i += 1;
        }
        (self.i - start >= min).then_some(value)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.s.get(self.i) == Some(&byte)).then(|| self.i += 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_from_postgres_text() {
        let ok = |text: &str| parse_postgres_timestamp(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("2024-05-01 12:34:56.789+00"), 1_714_566_896_789);
        assert_eq!(ok("2024-05-01 12:34:56.789123+00"), 1_714_566_896_789);
        assert_eq!(ok("2024-05-01 18:04:56.789+05:30"), 1_714_566_896_789);
        assert_eq!(ok("2024-05-01 04:34:56.789-08"), 1_714_566_896_789);
        assert_eq!(ok("2024-05-01T12:34:56.789"), 1_714_566_896_789, "timestamp without time zone is UTC");
        assert_eq!(ok("2024-05-01 12:34:56.7+00"), 1_714_566_896_700);
        assert_eq!(ok("2024-02-29"), 1_709_164_800_000, "a date is its midnight");
        assert_eq!(ok("1970-01-01 00:00:00+00"), 0);
        assert_eq!(ok("1969-12-31 23:59:59.9995+00"), -1, "sub-millisecond parts round towards the past");
        assert_eq!(ok("1883-11-18 12:03:58-04:56:02"), -2_717_650_800_000, "historic offsets have seconds");
        assert_eq!(ok("9999-12-31 23:59:59.999999+00"), 253_402_300_799_999);
        assert_eq!(ok("10000-01-01 00:00:00+00"), 253_402_300_800_000);
        assert_eq!(ok("0044-03-15 12:00:00+00 BC"), -63_517_780_800_000);
        assert_eq!(ok("infinity"), i64::MAX);
        assert_eq!(ok("-infinity"), i64::MIN);
        for bad in [
            "",
            "yesterday",
            "2024-13-01 00:00:00+00",
            "2024-02-30",
            "2023-02-29",
            "2024-05-01 12:34+00",
            "2024-05-01 12:34:56+0",
            "2024-05-01 12:34:56.+00",
            "2024-05-01 12:34:56+00 junk",
            "24-05-01",
        ] {
            assert!(parse_postgres_timestamp(bad).is_err(), "`{bad}` should not parse");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("5s"), Ok(5_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration_ms("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration_ms("fast").unwrap_err().contains("bad duration"));
    }

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
        let far = parse_timestamp("+999999-12-31T23:59:59Z").unwrap();
        assert_eq!(format_iso8601(far), "+999999-12-31T23:59:59.000Z");
        // Beyond six year digits too (found by fuzzing: a JSON number of epoch milliseconds
        // written back as text must read back), up to what milliseconds hold.
        for ms in [1_568_888_888_888_888_174, -9_000_000_000_000_000_000, i64::MAX - 1, i64::MIN + 1] {
            assert_eq!(parse_timestamp(&format_iso8601(ms)), Some(ms), "{}", format_iso8601(ms));
        }
        // Far beyond what milliseconds hold: no value, not a wrapped one.
        assert_eq!(parse_timestamp("+999999999-01-01"), None);
        assert_eq!(parse_timestamp("+1000000000-01-01"), None);
    }
}
