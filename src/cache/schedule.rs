//! The cache's timing rules, as pure functions so they can be tested exhaustively:
//! when to refresh, how much life a served token must have left, how long to back off.

use std::time::Duration;

use tokio::time::Instant;

use crate::provider::MAX_RETRY_AFTER;

/// Timing settings (all from the CLI).
#[derive(Clone, Debug)]
pub struct Policy {
    /// Never hand out a token with less life left than this (scaled down for short tokens).
    pub min_ttl: Duration,
    /// Refresh no later than this long before expiry (scaled down for short tokens).
    pub margin_floor: Duration,
    /// ... or this fraction of the lifetime before expiry, whichever is larger.
    pub margin_fraction: f64,
    /// Lifetime assumed when the provider's answer has no `expires_in`.
    pub default_lifetime: Duration,
    /// First retry delay after a transient failure.
    pub backoff_base: Duration,
    /// Largest retry delay after transient failures.
    pub backoff_max: Duration,
    /// Retry delay after a permanent failure (a config change retries at once).
    pub permanent_retry: Duration,
    /// How long a request without a servable token is held (for the fetch under way, or
    /// through a back-off for the next attempt) before it is answered 429.
    pub request_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_ttl: Duration::from_secs(60),
            margin_floor: Duration::from_secs(300),
            margin_fraction: 0.2,
            default_lifetime: Duration::from_secs(600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            permanent_retry: Duration::from_secs(3600),
            request_wait: Duration::from_secs(20),
        }
    }
}

/// The longest token lifetime we plan with; a longer `expires_in` is clamped to it. Every
/// real provider issues an hour or less (24 h at most), and a token kept for years would
/// outlive any revocation.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// `at + d`, checked: where the sum would overflow the clock (a delay of centuries), an
/// instant 30 years on, which is never reached either.
pub fn later(at: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// The shortest Retry-After while no token can be had: a client told less would come back
/// before anything changed and use up its retries (EmailEngine makes six requests in one
/// lookup).
pub const MIN_RETRY_HINT: Duration = Duration::from_secs(3);

/// How much sooner than the key's next attempt a client is told to come back, so that
/// its request is already waiting when the attempt's result arrives.
pub const RETRY_LEAD: Duration = Duration::from_secs(1);

/// The longest Retry-After EmailEngine honours (its RetryAgent's `maxTimeout`).
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(30);

/// The Retry-After for a request answered without a token: just before the key's next
/// attempt when that is known, between [`MIN_RETRY_HINT`] and [`MAX_RETRY_HINT`].
pub fn retry_hint(next_attempt_in: Option<Duration>) -> Duration {
    next_attempt_in.map_or(MIN_RETRY_HINT, |d| {
        d.saturating_sub(RETRY_LEAD)
            .clamp(MIN_RETRY_HINT, MAX_RETRY_HINT)
    })
}

/// Until when a request without a servable token is held while its key backs off, given
/// the request's bound (`deadline`) and the key's next attempt.
///
/// Through the attempt, when it is due within the bound. Otherwise until the last moment
/// from which a Retry-After of at most 30 s still brings the client back just before that
/// attempt, but no later than the bound: a client told to come back too early would spend
/// one of EmailEngine's six requests on waiting; one told too late misses the attempt.
pub fn hold_until(now: Instant, deadline: Instant, next_attempt: Instant) -> Instant {
    if next_attempt <= deadline {
        return next_attempt;
    }
    next_attempt
        .checked_sub(RETRY_LEAD + MAX_RETRY_HINT)
        .map_or(now, |t| t.max(now))
        .min(deadline)
}

/// When a token of a given lifetime is refreshed, and how much life it must keep to be served.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// From issue to the background refresh.
    pub refresh_after: Duration,
    /// Served only while at least this much life is left (unless a refresh failed).
    pub min_life: Duration,
}

/// Plans a token's refresh. `jitter` in `[0, 1)` spreads tokens issued together.
///
/// The margin is the larger of the floor and a fraction of the lifetime, but never more
/// than half of it, so a 5-minute (or 3-second) token is not refreshed the moment it
/// arrives. Jitter moves the refresh up to half a margin earlier. The minimum life is at
/// most half the margin, so the background refresh always lands before requests would
/// have to wait for one.
pub fn plan(lifetime: Duration, policy: &Policy, jitter: f64) -> Plan {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let l = lifetime.as_secs_f64();
    let margin = policy
        .margin_floor
        .as_secs_f64()
        .max(l * policy.margin_fraction)
        .min(l / 2.0);
    let refresh_after = (l - margin - margin / 2.0 * jitter).max(0.0);
    let min_life = policy.min_ttl.as_secs_f64().min(margin / 2.0);
    Plan {
        refresh_after: Duration::from_secs_f64(refresh_after),
        min_life: Duration::from_secs_f64(min_life),
    }
}

/// Delay before retry number `failures` (1 for the first failure): exponential from the
/// base, capped, with "equal jitter" (half fixed, half random), and never shorter than
/// the provider's `Retry-After`.
pub fn backoff(
    failures: u32,
    retry_after: Option<Duration>,
    policy: &Policy,
    jitter: f64,
) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let exp = failures.saturating_sub(1).min(30);
    let raw = policy
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(policy.backoff_max);
    let jittered = raw.mul_f64(0.5 + 0.5 * jitter);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// The least life a token must have left to be served stale (after a failed refresh):
/// a quarter of its minimum life, at most one second, so that it does not expire on its
/// way to EmailEngine or in the moment EmailEngine uses it.
pub fn stale_floor(min_life: Duration) -> Duration {
    (min_life / 4).min(Duration::from_secs(1))
}

/// How a cached token may be used at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Enough life left: serve it.
    Fresh,
    /// Valid, but under the minimum life: get a new one, serve this only if that fails.
    Aging,
    /// Expired: never served.
    Expired,
}

/// Classifies a token with `remaining` life (`None` once expired).
pub fn freshness(remaining: Option<Duration>, min_life: Duration) -> Freshness {
    match remaining {
        None => Freshness::Expired,
        Some(r) if r.is_zero() => Freshness::Expired,
        Some(r) if r >= min_life => Freshness::Fresh,
        Some(_) => Freshness::Aging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(min_ttl: u64) -> Policy {
        Policy {
            min_ttl: Duration::from_secs(min_ttl),
            ..Policy::default()
        }
    }

    #[test]
    fn a_provider_retry_after_imposes_at_most_the_cap() {
        let p = Policy::default();
        assert!(MAX_RETRY_AFTER <= Duration::from_secs(300));
        for ra in [121, 3600, 86_400, u64::MAX] {
            for jitter in [0.0, 0.5, 1.0] {
                let d = backoff(1, Some(Duration::from_secs(ra)), &p, jitter);
                assert_eq!(d, MAX_RETRY_AFTER, "Retry-After {ra}");
            }
        }
        // Under the cap it is honoured as it is.
        assert_eq!(
            backoff(1, Some(Duration::from_secs(90)), &p, 0.0),
            Duration::from_secs(90)
        );
        // A --backoff-max above the cap still governs the provider's own failures.
        let long = Policy {
            backoff_max: Duration::from_secs(600),
            ..Policy::default()
        };
        let d = backoff(20, Some(Duration::from_secs(86_400)), &long, 1.0);
        assert_eq!(d, Duration::from_secs(600));
    }

    #[test]
    fn typical_lifetimes() {
        let p = plan(Duration::from_secs(3600), &policy(60), 0.0);
        assert_eq!(p.refresh_after, Duration::from_secs(2880));
        assert_eq!(p.min_life, Duration::from_secs(60));
        let p = plan(Duration::from_secs(3), &policy(60), 0.0);
        assert_eq!(p.refresh_after, Duration::from_secs_f64(1.5));
        assert_eq!(p.min_life, Duration::from_secs_f64(0.75));
    }

    #[test]
    fn retry_hints_bring_the_client_back_just_before_the_next_attempt() {
        let s = Duration::from_secs;
        assert_eq!(retry_hint(Some(s(17))), s(16));
        assert_eq!(
            retry_hint(Some(Duration::from_millis(16_300))),
            Duration::from_millis(15_300)
        );
        // Never so short that the client only comes back to wait, never over EmailEngine's cap.
        assert_eq!(retry_hint(Some(s(2))), MIN_RETRY_HINT);
        assert_eq!(retry_hint(Some(Duration::ZERO)), MIN_RETRY_HINT);
        assert_eq!(retry_hint(None), MIN_RETRY_HINT);
        assert_eq!(retry_hint(Some(s(3600))), MAX_RETRY_HINT);
    }

    #[test]
    fn a_request_is_held_through_an_attempt_within_its_bound_else_until_it_can_be_sent_back() {
        let s = Duration::from_secs;
        let now = Instant::now();
        let deadline = now + s(20);
        // The attempt is within the bound: hold through it.
        assert_eq!(hold_until(now, deadline, now + s(7)), now + s(7));
        // Reachable with one Retry-After: answer at once (the client returns 1 s early).
        assert_eq!(hold_until(now, deadline, now + s(25)), now);
        // Further: hold until a 30 s Retry-After lands just before it...
        assert_eq!(hold_until(now, deadline, now + s(45)), now + s(14));
        // ... but never past the bound.
        assert_eq!(hold_until(now, deadline, now + s(90)), deadline);
    }

    proptest! {
        /// The refresh is always scheduled after issue, and before the token falls under
        /// its minimum life, for any lifetime and jitter.
        #[test]
        fn refresh_lands_before_min_life(lifetime_ms in 1u64..10_000_000, min_ttl in 0u64..3600, jitter in 0.0f64..1.0) {
            let l = Duration::from_millis(lifetime_ms);
            let p = plan(l, &policy(min_ttl), jitter);
            prop_assert!(p.refresh_after > Duration::ZERO);
            prop_assert!(p.refresh_after >= l / 4 - Duration::from_micros(1));
            prop_assert!(p.refresh_after + p.min_life < l);
            prop_assert!(p.min_life <= Duration::from_secs(min_ttl));
        }

        /// A token is served as fresh only with at least the minimum life left, and an
        /// expired token is never served at all.
        #[test]
        fn never_serves_under_min_life(remaining_ms in 0u64..10_000_000, min_life_ms in 0u64..1_000_000) {
            let r = Duration::from_millis(remaining_ms);
            let m = Duration::from_millis(min_life_ms);
            match freshness(Some(r), m) {
                Freshness::Fresh => prop_assert!(r >= m && !r.is_zero()),
                Freshness::Aging => prop_assert!(r < m && !r.is_zero()),
                Freshness::Expired => prop_assert!(r.is_zero()),
            }
            prop_assert_eq!(freshness(None, m), Freshness::Expired);
        }

        /// Backoff grows, stays within the cap (or Retry-After), and honours Retry-After.
        #[test]
        fn backoff_is_bounded(failures in 1u32..100, ra in proptest::option::of(0u64..10_000), jitter in 0.0f64..1.0) {
            let p = Policy::default();
            let d = backoff(failures, ra.map(Duration::from_secs), &p, jitter);
            let cap = p.backoff_max.max(ra.map(Duration::from_secs).unwrap_or_default().min(MAX_RETRY_AFTER));
            prop_assert!(d <= cap);
            prop_assert!(d >= p.backoff_base / 2);
            if let Some(ra) = ra {
                prop_assert!(d >= Duration::from_secs(ra).min(MAX_RETRY_AFTER));
            }
        }

        /// For every policy the CLI can express (any --min-ttl, any --refresh-margin, the
        /// fixed fraction or any other above zero) and any lifetime: the refresh comes
        /// after issue and before expiry; until it comes the token is served as fresh (so
        /// with a healthy provider no request waits); a token is served as fresh only with
        /// its minimum life left; and a stale one (after a failed refresh) keeps a floor.
        #[test]
        fn scheduling_rules_hold_for_any_policy(
            lifetime_ms in 1u64..100_000_000,
            min_ttl_ms in 0u64..7_200_000,
            margin_floor_ms in 0u64..7_200_000,
            margin_fraction in 0.01f64..=1.0,
            jitter in 0.0f64..1.0,
            probe in 0.0f64..=1.0,
        ) {
            let policy = Policy {
                min_ttl: Duration::from_millis(min_ttl_ms),
                margin_floor: Duration::from_millis(margin_floor_ms),
                margin_fraction,
                ..Policy::default()
            };
            let l = Duration::from_millis(lifetime_ms);
            let p = plan(l, &policy, jitter);
            // Refresh time is always after issue and before expiry...
            prop_assert!(p.refresh_after > Duration::ZERO);
            prop_assert!(p.refresh_after < l);
            // ...while the token is still fresh, and stays fresh until then.
            prop_assert_eq!(freshness(Some(l - p.refresh_after), p.min_life), Freshness::Fresh);
            let t = p.refresh_after.mul_f64(probe);
            prop_assert_eq!(freshness(Some(l - t), p.min_life), Freshness::Fresh);
            // Never more minimum life than configured.
            prop_assert!(p.min_life <= policy.min_ttl);
            // Served as fresh only with the minimum life left (at any moment `t` of its life).
            let t = l.mul_f64(probe);
            let remaining = l.checked_sub(t).filter(|r| !r.is_zero());
            match freshness(remaining, p.min_life) {
                Freshness::Fresh => prop_assert!(l - t >= p.min_life && t < l),
                Freshness::Aging => prop_assert!(l - t < p.min_life && t < l),
                Freshness::Expired => prop_assert!(t >= l),
            }
            // A stale token keeps some life, never more than the minimum life demands.
            let floor = stale_floor(p.min_life);
            prop_assert!(floor <= p.min_life && floor <= Duration::from_secs(1));
            prop_assert!(p.min_life.is_zero() || !floor.is_zero());
        }

        /// Back-off never shrinks as failures accumulate (same jitter), never goes under
        /// half the exponential step, and never over the cap, for any base and cap.
        #[test]
        fn backoff_grows_within_the_schedule(
            base_ms in 1u64..10_000,
            cap_factor in 1u64..1000,
            failures in 1u32..64,
            jitter in 0.0f64..1.0,
        ) {
            let policy = Policy {
                backoff_base: Duration::from_millis(base_ms),
                backoff_max: Duration::from_millis(base_ms * cap_factor),
                ..Policy::default()
            };
            let d = backoff(failures, None, &policy, jitter);
            let next = backoff(failures + 1, None, &policy, jitter);
            prop_assert!(next >= d);
            let step = policy
                .backoff_base
                .saturating_mul(1 << (failures - 1).min(30))
                .min(policy.backoff_max);
            prop_assert!(d >= step / 2 && d <= step);
            prop_assert!(d <= policy.backoff_max);
        }
    }
}
