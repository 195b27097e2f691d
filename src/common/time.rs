//! Dates as clipdex reads and stores them: `YYYY-MM-DD[THH:MM:SS]`, UTC.

/// Earliest and latest years a date may have: the index stores times as
/// nanoseconds in an `i64`, which reach from 1677 to 2262; photographs
/// begin in the 1820s.
pub const MIN_YEAR: i64 = 1800;
pub const MAX_YEAR: i64 = 2200;

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS` (a space for the `T` too) to
/// seconds since the epoch; `None` for anything else: other lengths or
/// separators, signs, impossible dates (February 30th), years outside
/// [`MIN_YEAR`]..=[`MAX_YEAR`]. Reads the text as bytes, never slicing it.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 && b.len() != 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0i64, |n, d| n * 10 + (d - b'0') as i64))
    };
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = if b.len() == 19 {
        if !matches!(b[10], b'T' | b' ') || b[13] != b':' || b[16] != b':' {
            return None;
        }
        (num(11..13)?, num(14..16)?, num(17..19)?)
    } else {
        (0, 0, 0)
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(MIN_YEAR..=MAX_YEAR).contains(&y)
        || !(1..=days_in_month).contains(&d)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Now, in seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Now, in milliseconds since the epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the epoch to `YYYY-MM-DDTHH:MM:SS` (UTC), the form
/// [`parse_datetime`] reads back.
pub fn format_datetime(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_reads_back() {
        assert_eq!(format_datetime(0), "1970-01-01T00:00:00");
        assert_eq!(format_datetime(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(format_datetime(-1), "1969-12-31T23:59:59");
        for secs in (-5_000_000_000i64..7_000_000_000).step_by(86_399 * 37 + 11) {
            assert_eq!(parse_datetime(&format_datetime(secs)), Some(secs), "{secs}");
        }
    }
}
