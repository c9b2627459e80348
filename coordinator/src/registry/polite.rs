//! Being polite to registries: a token bucket per host, `429`/`Retry-After`, and
//! exponential backoff with jitter after 5xx answers and network failures. Each host
//! has its own state behind its own short-held lock, so a failing registry never slows
//! another.

use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Serialize;
use tokio::time::Instant;

use super::error::RegistryError;

/// How the resolver paces and backs off, per registry host.
#[derive(Debug, Clone)]
pub struct Politeness {
    /// Sustained requests per second to one host.
    pub requests_per_second: f64,
    /// Requests that may go out at once before the rate applies.
    pub burst: u32,
    /// First backoff after a failure; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Wait after a `429` without a usable `Retry-After`.
    pub default_retry_after: Duration,
    /// Consecutive failures after which a host is reported unhealthy.
    pub unhealthy_after: u32,
}

impl Default for Politeness {
    fn default() -> Self {
        Politeness {
            requests_per_second: 10.0,
            burst: 20,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
            default_retry_after: Duration::from_secs(60),
            unhealthy_after: 3,
        }
    }
}

/// Backoff before the next attempt after `failures` consecutive failures (>= 1):
/// `base * 2^(failures-1)` capped at `max`, with "equal jitter": half fixed, half
/// scaled by `jitter` (a random number in `[0, 1)`), so many coordinators do not
/// retry in step.
pub(crate) fn backoff_delay(failures: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exponent).min(max);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The longest wait a `Retry-After` imposes. A registry (or a notification receiver)
/// asking for more, up to `18446744073709551615` seconds or a date in the year 9999, is
/// asked again after this: long enough to be polite to a registry that is throttling,
/// short enough that a wrong or hostile answer costs one host ten minutes, not forever.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

/// The wait an answer's `Retry-After` header asks for ([`parse_retry_after`]); `None`
/// without a usable one.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (relative to `now`), at most
/// [`MAX_RETRY_AFTER`]. A date in the past means "now"; more seconds than fit in a `u64`
/// are the cap; anything unparsable is `None`.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// `now + delay` without the panic of `Instant + Duration`: the delays here are capped
/// (Retry-After, backoff, token lifetimes), so the sum always fits; should it not, the
/// deadline is `now` (no wait) rather than a crash.
pub(crate) fn deadline(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay).unwrap_or(now)
}

/// A classic token bucket.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            per_second: per_second.max(f64::MIN_POSITIVE),
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token, or says how long to wait for one.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[derive(Debug, Clone)]
enum Block {
    RateLimited,
    BackingOff { reason: String },
}

/// One registry host's pacing and health. Kept behind a `std::sync::Mutex` that is
/// never held across an await.
#[derive(Debug)]
pub(crate) struct HostState {
    bucket: TokenBucket,
    blocked: Option<(Instant, Timestamp, Block)>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// What the coordinator reports about one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostHealth {
    pub host: String,
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// While rate-limited or backing off: when the host is asked again.
    pub blocked_until: Option<Timestamp>,
}

fn wall_clock_after(delay: Duration) -> Timestamp {
    let now = Timestamp::now();
    jiff::SignedDuration::try_from(delay)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

impl HostState {
    pub(crate) fn new(politeness: &Politeness, now: Instant) -> Self {
        HostState {
            bucket: TokenBucket::new(politeness.requests_per_second, politeness.burst, now),
            blocked: None,
            consecutive_failures: 0,
            last_error: None,
        }
    }

    /// Whether a request may go out now: `Err` while the host is rate-limited or backing
    /// off, `Ok(Some(wait))` when the bucket is empty, `Ok(None)` to go.
    pub(crate) fn admit(
        &mut self,
        host: &str,
        now: Instant,
    ) -> Result<Option<Duration>, RegistryError> {
        if let Some((until, until_wall, block)) = &self.blocked {
            if now < *until {
                return Err(match block {
                    Block::RateLimited => RegistryError::RateLimited {
                        registry: host.to_owned(),
                        until: *until_wall,
                    },
                    Block::BackingOff { reason } => RegistryError::BackingOff {
                        registry: host.to_owned(),
                        until: *until_wall,
                        reason: reason.clone(),
                    },
                });
            }
            self.blocked = None;
        }
        Ok(self.bucket.take(now).err())
    }

    /// Records a `429`: no request before `now + retry_after`.
    pub(crate) fn rate_limited(
        &mut self,
        host: &str,
        now: Instant,
        retry_after: Duration,
    ) -> RegistryError {
        let until_wall = wall_clock_after(retry_after);
        self.blocked = Some((deadline(now, retry_after), until_wall, Block::RateLimited));
        self.last_error = Some("rate-limited (429)".to_owned());
        RegistryError::RateLimited {
            registry: host.to_owned(),
            until: until_wall,
        }
    }

    /// Records the outcome of a request.
    pub(crate) fn record(
        &mut self,
        outcome: Result<(), &RegistryError>,
        politeness: &Politeness,
        now: Instant,
        jitter: f64,
    ) {
        match outcome {
            Ok(()) => {
                self.consecutive_failures = 0;
                self.last_error = None;
            }
            Err(error) if error.is_registry_failure() => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let delay = backoff_delay(
                    self.consecutive_failures,
                    politeness.backoff_base,
                    politeness.backoff_max,
                    jitter,
                );
                let reason = error.to_string();
                self.blocked = Some((
                    deadline(now, delay),
                    wall_clock_after(delay),
                    Block::BackingOff {
                        reason: reason.clone(),
                    },
                ));
                self.last_error = Some(reason);
            }
            // Auth, not found, bad manifests: the registry itself works.
            Err(error) => {
                self.consecutive_failures = 0;
                self.last_error = Some(error.to_string());
            }
        }
    }

    pub(crate) fn health(&self, host: &str, politeness: &Politeness, now: Instant) -> HostHealth {
        HostHealth {
            host: host.to_owned(),
            healthy: self.consecutive_failures < politeness.unhealthy_after,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
            blocked_until: self
                .blocked
                .as_ref()
                .filter(|(until, _, _)| now < *until)
                .map(|(_, wall, _)| *wall),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        let at = |n, j| backoff_delay(n, base, max, j);
        assert_eq!(at(1, 0.0), Duration::from_secs(1));
        assert_eq!(at(1, 1.0), Duration::from_secs(2));
        assert_eq!(at(2, 1.0), Duration::from_secs(4));
        assert_eq!(at(3, 0.5), Duration::from_secs(6));
        assert_eq!(at(10, 1.0), max);
        assert_eq!(at(u32::MAX, 1.0), max);
        assert_eq!(at(10, 0.0), max / 2);
        for n in 1..40 {
            assert!(at(n, 0.0) <= at(n, 0.99) && at(n, 0.99) <= max);
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:30 GMT", now),
            Some(Duration::from_secs(150))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("+5", now), None);
        assert_eq!(parse_retry_after("", now), None);

        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, " 120 ".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(120)));
        headers.insert(
            RETRY_AFTER,
            reqwest::header::HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        assert_eq!(retry_after(&headers, now), None, "not text");
    }

    #[test]
    fn retry_after_is_capped() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        for far in [
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999999999",
            "601",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            assert_eq!(parse_retry_after(far, now), Some(MAX_RETRY_AFTER), "{far}");
        }
        assert_eq!(
            parse_retry_after("600", now),
            Some(Duration::from_secs(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(
            deadline(now, Duration::MAX),
            now,
            "unrepresentable: no wait"
        );
        // A 429 asking for u64::MAX seconds blocks the host for the cap, not forever.
        let p = Politeness::default();
        let mut host = HostState::new(&p, now);
        let retry_after = parse_retry_after("18446744073709551615", SystemTime::now()).unwrap();
        host.rate_limited("reg.io", now, retry_after);
        tokio::time::advance(MAX_RETRY_AFTER - Duration::from_secs(1)).await;
        assert!(host.admit("reg.io", Instant::now()).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(host.admit("reg.io", Instant::now()), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_paces_after_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        assert_eq!(bucket.take(start), Err(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(bucket.take(Instant::now()), Ok(()));
        tokio::time::advance(Duration::from_secs(100)).await;
        for _ in 0..3 {
            assert_eq!(bucket.take(Instant::now()), Ok(()));
        }
        assert!(
            bucket.take(Instant::now()).is_err(),
            "capacity caps the refill"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_blocks_until_retry_after() {
        let p = Politeness::default();
        let mut host = HostState::new(&p, Instant::now());
        let err = host.rate_limited("reg.io", Instant::now(), Duration::from_secs(30));
        assert!(matches!(err, RegistryError::RateLimited { .. }));
        tokio::time::advance(Duration::from_secs(29)).await;
        let err = host.admit("reg.io", Instant::now()).unwrap_err();
        assert!(err.to_string().contains("rate-limiting"), "{err}");
        assert!(
            host.health("reg.io", &p, Instant::now())
                .blocked_until
                .is_some()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(host.admit("reg.io", Instant::now()), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_mark_unhealthy() {
        let p = Politeness {
            backoff_base: Duration::from_secs(2),
            unhealthy_after: 2,
            ..Politeness::default()
        };
        let mut host = HostState::new(&p, Instant::now());
        let failure = RegistryError::Server {
            registry: "reg.io".into(),
            image: "reg.io/app:v1".into(),
            status: 503,
        };
        host.record(Err(&failure), &p, Instant::now(), 1.0);
        assert!(host.health("reg.io", &p, Instant::now()).healthy);
        let err = host.admit("reg.io", Instant::now()).unwrap_err();
        assert!(matches!(err, RegistryError::BackingOff { .. }), "{err}");
        assert!(err.to_string().contains("503"), "{err}");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(host.admit("reg.io", Instant::now()), Ok(None));
        host.record(Err(&failure), &p, Instant::now(), 1.0);
        assert!(!host.health("reg.io", &p, Instant::now()).healthy);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            host.admit("reg.io", Instant::now()).is_err(),
            "second backoff is 4 s"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(host.admit("reg.io", Instant::now()), Ok(None));
        host.record(Ok(()), &p, Instant::now(), 0.0);
        let health = host.health("reg.io", &p, Instant::now());
        assert!(health.healthy);
        assert_eq!(health.consecutive_failures, 0);

        let not_found = RegistryError::NotFound {
            registry: "reg.io".into(),
            image: "reg.io/x:y".into(),
        };
        host.record(Err(&not_found), &p, Instant::now(), 0.5);
        assert_eq!(
            host.admit("reg.io", Instant::now()),
            Ok(None),
            "404 is no backoff"
        );
    }

    use proptest::prelude::*;

    /// Seconds since the epoch up to the last second of the year 9999.
    const YEAR_9999: u64 = 253_402_300_799;

    proptest! {
        #[test]
        fn any_retry_after_is_within_the_cap(value in any::<String>(), now in 0..=YEAR_9999) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
            if let Some(wait) = parse_retry_after(&value, now) {
                prop_assert!(wait <= MAX_RETRY_AFTER);
            }
        }

        #[test]
        fn seconds_and_dates_wait_as_asked_up_to_the_cap(
            seconds in any::<u64>(),
            digits in "[0-9]{1,60}",
            at in 0..=YEAR_9999,
            now in 0..=YEAR_9999,
        ) {
            let now_time = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
            prop_assert_eq!(
                parse_retry_after(&seconds.to_string(), now_time),
                Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
            );
            let wait = parse_retry_after(&digits, now_time);
            prop_assert!(wait.is_some_and(|w| w <= MAX_RETRY_AFTER));
            let date = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(at));
            prop_assert_eq!(
                parse_retry_after(&date, now_time),
                Some(Duration::from_secs(at.saturating_sub(now)).min(MAX_RETRY_AFTER))
            );
        }

        #[test]
        fn no_wait_panics_a_host(seconds in any::<u64>(), nanos in 0..1_000_000_000u32) {
            let delay = Duration::new(seconds, nanos);
            let p = Politeness::default();
            let now = Instant::now();
            let mut host = HostState::new(&p, now);
            host.rate_limited("reg.io", now, delay);
            let blocked = host.admit("reg.io", now).is_err();
            prop_assert_eq!(blocked, deadline(now, delay) > now);
        }
    }
}
