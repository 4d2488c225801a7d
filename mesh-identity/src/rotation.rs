//! When to re-issue an SVID: at half its lifetime, as Istio and SPIRE do, so a failed
//! re-issue has the other half to be retried before peers start refusing the
//! certificate. Pure: the caller owns the clock and the timer.

use std::time::Duration;

use time::OffsetDateTime;

/// What to do with a certificate at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Past half life (or past expiry): issue a new one now.
    Reissue,
    /// Keep it; look again after this long.
    Keep(Duration),
}

/// Half-way between `not_before` and `not_after`.
pub fn refresh_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    not_before + (not_after - not_before) / 2
}

/// Whether a certificate valid from `not_before` to `not_after` must be re-issued at
/// `now`, and if not, for how long it can be kept.
pub fn decide(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Decision {
    let left = refresh_at(not_before, not_after) - now;
    match Duration::try_from(left) {
        Ok(left) if !left.is_zero() => Decision::Keep(left),
        _ => Decision::Reissue,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::{Decision, decide, refresh_at};

    #[test]
    fn reissues_from_half_life_on() {
        let not_before = datetime!(2030-01-01 00:00 UTC);
        let not_after = datetime!(2030-01-02 00:00 UTC);
        assert_eq!(
            refresh_at(not_before, not_after),
            datetime!(2030-01-01 12:00 UTC)
        );
        for (now, decision) in [
            (
                datetime!(2029-12-31 23:59 UTC),
                Decision::Keep(Duration::from_secs(12 * 3600 + 60)),
            ),
            (not_before, Decision::Keep(Duration::from_secs(12 * 3600))),
            (
                datetime!(2030-01-01 11:59:59 UTC),
                Decision::Keep(Duration::from_secs(1)),
            ),
            (datetime!(2030-01-01 12:00 UTC), Decision::Reissue),
            (datetime!(2030-01-01 18:00 UTC), Decision::Reissue),
            (not_after, Decision::Reissue),
            (datetime!(2031-01-01 00:00 UTC), Decision::Reissue),
        ] {
            assert_eq!(decide(not_before, not_after, now), decision, "at {now}");
        }
    }
}
