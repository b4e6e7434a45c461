//! Calendar months in UTC, as the month budgets count them: which month a
//! moment falls in (its key part `YYYYMM`), when it started (the ledger query
//! of a re-seed) and when it ends (the key's TTL and `x-ratelimit-reset-tokens`).
//! Pure arithmetic on unix milliseconds (Howard Hinnant's civil-date algorithms).

/// One UTC calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    /// `YYYY * 100 + MM`, e.g. 202612.
    pub number: u32,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil (year, month) of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m)
}

const DAY_MS: i64 = 86_400_000;

impl Month {
    pub fn at(unix_ms: i64) -> Self {
        let (y, m) = civil_from_days(unix_ms.div_euclid(DAY_MS));
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Self {
            number: u32::try_from(y * 100 + i64::from(m)).unwrap_or(0),
            start_ms: days_from_civil(y, m, 1) * DAY_MS,
            end_ms: days_from_civil(ny, nm, 1) * DAY_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_and_end_on_the_first_utc_midnight() {
        // 2026-12-01T23:41:05Z
        let m = Month::at(1_796_168_465_000);
        assert_eq!(m.number, 202612);
        assert_eq!(m.start_ms, 1_796_083_200_000); // 2026-12-01T00:00:00Z
        assert_eq!(m.end_ms, 1_798_761_600_000); // 2027-01-01T00:00:00Z
        assert_eq!(Month::at(m.end_ms).number, 202701);
        assert_eq!(Month::at(m.end_ms - 1).number, 202612);
        // A leap February.
        let feb = Month::at(days_from_civil(2028, 2, 15) * DAY_MS);
        assert_eq!(
            (feb.number, (feb.end_ms - feb.start_ms) / DAY_MS),
            (202802, 29)
        );
        assert_eq!(Month::at(0).number, 197001);
    }
}
