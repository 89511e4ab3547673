//! Deadlines from user-given timeouts. `Instant + Duration` panics when the sum does not fit
//! (`--timeout 1e19`: review session 6, finding 4); such a timeout means "no deadline", which
//! a deadline centuries away is.

use std::time::{Duration, Instant};

/// How far a deadline can be: beyond any timeout meant as one (about 136 years).
const FAR: Duration = Duration::from_secs(u32::MAX as u64);

/// The instant `timeout` from now, or [`FAR`] from now when that does not fit.
pub(crate) fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_timeout_is_a_far_deadline_not_a_panic() {
        let d = after(Duration::from_secs_f64(1e19));
        assert!(d > Instant::now() + Duration::from_secs(365 * 86_400));
        assert!(after(Duration::MAX) > Instant::now());
    }

    #[test]
    fn an_ordinary_timeout_is_exact() {
        let before = Instant::now();
        let d = after(Duration::from_millis(250));
        assert!(d >= before + Duration::from_millis(250));
        assert!(d <= Instant::now() + Duration::from_millis(250));
    }
}
