//! Rollout windows: when a policy allows its patches (krar's "smart restart at 03:00").
//! A window opens at each time of a cron schedule, read in a time zone, and stays open
//! for a duration. Drift is found and warmed at any time; only the patch waits.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

/// A checked rollout window.
#[derive(Debug, Clone)]
pub struct RolloutWindow {
    schedule: Cron,
    /// The schedule as written, for messages.
    text: String,
    duration: Duration,
    zone: TimeZone,
}

/// Whether patches are allowed at an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowState {
    /// Open until `closes`.
    Open { closes: Zoned },
    /// Closed; the next window opens at `opens` (`None`: the schedule never fires again).
    Closed { opens: Option<Zoned> },
}

impl RolloutWindow {
    /// From the policy's `window` keys. Errors name the key that is wrong.
    pub fn new(
        schedule: &str,
        duration: Duration,
        time_zone: Option<&str>,
    ) -> Result<Self, (&'static str, String)> {
        // Five fields (minute first) or six (seconds first).
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(schedule)
            .map_err(|e| ("schedule", format!("{schedule:?}: {e}")))?;
        if duration.is_zero() {
            return Err(("duration", "must be more than 0s".to_owned()));
        }
        let zone = match time_zone {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|e| {
                (
                    "timeZone",
                    format!("{name:?} is not an IANA time zone (like Europe/Berlin): {e}"),
                )
            })?,
        };
        Ok(RolloutWindow {
            schedule: cron,
            text: schedule.to_owned(),
            duration,
            zone,
        })
    }

    /// Open or closed at `now`: open when a schedule time falls in (now − duration, now].
    pub fn state(&self, now: Timestamp) -> WindowState {
        let length = SignedDuration::try_from(self.duration).unwrap_or(SignedDuration::MAX);
        let zoned = |t: Timestamp| t.to_zoned(self.zone.clone());
        let start = now.checked_sub(length).unwrap_or(Timestamp::MIN);
        // The first opening after the earliest instant whose window would reach now.
        let Ok(first) = self.schedule.find_next_occurrence(&zoned(start), false) else {
            return WindowState::Closed { opens: None };
        };
        if first.timestamp() <= now {
            let closes = first
                .timestamp()
                .checked_add(length)
                .map_or_else(|_| zoned(Timestamp::MAX), zoned);
            return WindowState::Open { closes };
        }
        WindowState::Closed { opens: Some(first) }
    }

    /// What the report says while a patch waits for this window.
    pub fn waiting(&self, opens: Option<&Zoned>) -> String {
        match opens {
            Some(at) => format!(
                "waiting for the rollout window: next opens at {} for {} ({})",
                at.strftime("%Y-%m-%d %H:%M:%S %Z"),
                friendly(self.duration),
                self.text
            ),
            None => format!(
                "waiting for the rollout window: the schedule {:?} never opens again",
                self.text
            ),
        }
    }
}

fn friendly(duration: Duration) -> String {
    SignedDuration::try_from(duration)
        .map_or_else(|_| format!("{duration:?}"), |d| format!("{d:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn window(schedule: &str, minutes: u64, zone: Option<&str>) -> RolloutWindow {
        RolloutWindow::new(schedule, Duration::from_secs(minutes * 60), zone).unwrap()
    }

    #[test]
    fn open_from_each_schedule_time_for_the_duration() {
        let w = window("0 3 * * *", 60, None);
        assert_eq!(
            w.state(at("2026-12-07T03:00:00Z")),
            WindowState::Open {
                closes: at("2026-12-07T04:00:00Z").to_zoned(TimeZone::UTC)
            }
        );
        assert!(matches!(
            w.state(at("2026-12-07T03:59:59Z")),
            WindowState::Open { .. }
        ));
        assert_eq!(
            w.state(at("2026-12-07T04:00:00Z")),
            WindowState::Closed {
                opens: Some(at("2026-12-08T03:00:00Z").to_zoned(TimeZone::UTC))
            }
        );
        assert_eq!(
            w.state(at("2026-12-07T02:59:59Z")),
            WindowState::Closed {
                opens: Some(at("2026-12-07T03:00:00Z").to_zoned(TimeZone::UTC))
            }
        );
    }

    #[test]
    fn the_schedule_is_read_in_the_time_zone() {
        // 03:00 in Berlin is 02:00 UTC in winter.
        let w = window("0 3 * * *", 30, Some("Europe/Berlin"));
        assert!(matches!(
            w.state(at("2026-12-07T02:10:00Z")),
            WindowState::Open { .. }
        ));
        let WindowState::Closed { opens: Some(opens) } = w.state(at("2026-12-07T03:10:00Z")) else {
            panic!("closed expected");
        };
        assert_eq!(opens.timestamp(), at("2026-12-08T02:00:00Z"));
        let text = w.waiting(Some(&opens));
        assert!(text.contains("2026-12-08 03:00:00 CET"), "{text}");
        assert!(text.contains("30m"), "{text}");
    }

    #[test]
    fn a_window_longer_than_the_period_is_always_open() {
        let w = window("*/5 * * * *", 10, None);
        for minute in 0..10 {
            let now = at("2026-12-07T10:00:30Z")
                .checked_add(SignedDuration::from_mins(minute))
                .unwrap();
            assert!(matches!(w.state(now), WindowState::Open { .. }), "{now}");
        }
    }

    #[test]
    fn six_fields_start_with_seconds() {
        let w = RolloutWindow::new("30 * * * * *", Duration::from_secs(5), None).unwrap();
        for open in ["2026-12-07T10:00:30Z", "2026-12-07T10:00:34.9Z"] {
            assert!(
                matches!(w.state(at(open)), WindowState::Open { .. }),
                "{open}"
            );
        }
        assert_eq!(
            w.state(at("2026-12-07T10:00:35Z")),
            WindowState::Closed {
                opens: Some(at("2026-12-07T10:01:30Z").to_zoned(TimeZone::UTC))
            }
        );
    }

    #[test]
    fn bad_keys_are_named() {
        let err = |s, d, z| {
            RolloutWindow::new(s, Duration::from_secs(d), z)
                .unwrap_err()
                .0
        };
        assert_eq!(err("not cron", 60, None), "schedule");
        assert_eq!(err("0 3 * * *", 0, None), "duration");
        assert_eq!(err("0 3 * * *", 60, Some("Mars/Olympus")), "timeZone");
    }
}
