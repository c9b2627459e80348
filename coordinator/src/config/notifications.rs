//! `notifications`: outbound webhooks on rollout transitions, as written and checked.
//! A receiver's URL and header values are secrets (a Slack URL carries its token): they
//! appear in no `Debug` output and no error message; a receiver is named by `name` or,
//! without one, by its index (`receiver-0`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{Checked, invalid, parse_duration};

/// A rollout transition a notification reports.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyEvent {
    /// A workload's containers drift onto a digest not seen drifting before.
    DriftFound,
    /// The warm gate opened: the threshold share of target nodes hold the new image.
    WarmUpDone,
    /// The warm-up ended below its threshold (timed out or failed on the nodes).
    WarmUpFailed,
    /// The rollout patch was written.
    Patched,
    /// Every pod runs the new digest.
    Converged,
    /// The rollout is held (warm-up below threshold with `onTimeout: hold`, or new pods
    /// that did not come up on the digest).
    Held,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 6] = [
        NotifyEvent::DriftFound,
        NotifyEvent::WarmUpDone,
        NotifyEvent::WarmUpFailed,
        NotifyEvent::Patched,
        NotifyEvent::Converged,
        NotifyEvent::Held,
    ];

    /// The name in configuration, bodies and metrics.
    pub fn name(self) -> &'static str {
        match self {
            NotifyEvent::DriftFound => "drift-found",
            NotifyEvent::WarmUpDone => "warm-up-done",
            NotifyEvent::WarmUpFailed => "warm-up-failed",
            NotifyEvent::Patched => "patched",
            NotifyEvent::Converged => "converged",
            NotifyEvent::Held => "held",
        }
    }
}

/// The body a receiver gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// warmroll's JSON object (event, workload, policy, images, reason, time).
    #[default]
    Json,
    /// Slack's incoming-webhook form, `{"text": "..."}` (Mattermost, Rocket.Chat and
    /// Teams workflows take it too).
    Slack,
}

/// One checked receiver. `Debug` shows neither the URL nor header values.
#[derive(Clone)]
pub struct NotifyReceiver {
    /// How logs and metrics name it.
    pub name: String,
    pub url: Url,
    pub format: NotifyFormat,
    /// The events it gets.
    pub events: BTreeSet<NotifyEvent>,
    pub headers: HeaderMap,
    /// Per delivery attempt.
    pub timeout: Duration,
    /// Attempts per notification, the first included.
    pub max_attempts: u32,
    /// Notifications waiting for delivery; more are dropped (and counted).
    pub queue_size: usize,
}

impl std::fmt::Debug for NotifyReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<&str> = self.headers.keys().map(HeaderName::as_str).collect();
        f.debug_struct("NotifyReceiver")
            .field("name", &self.name)
            .field("url", &"<redacted>")
            .field("format", &self.format)
            .field("events", &self.events)
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

/// `notifications` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawNotifications {
    receivers: Option<Vec<RawReceiver>>,
}

/// `notifications.receivers[i]` as written. `Debug` shows no URL or header value.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawReceiver {
    name: Option<String>,
    url: Option<String>,
    format: Option<NotifyFormat>,
    events: Option<Vec<NotifyEvent>>,
    headers: Option<BTreeMap<String, String>>,
    timeout: Option<String>,
    max_attempts: Option<u32>,
    queue_size: Option<usize>,
}

impl std::fmt::Debug for RawReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawReceiver")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl RawNotifications {
    pub(super) fn check(self) -> Checked<Vec<NotifyReceiver>> {
        let mut receivers: Vec<NotifyReceiver> = Vec::new();
        for (i, raw) in self.receivers.unwrap_or_default().into_iter().enumerate() {
            let field = format!("notifications.receivers[{i}]");
            let receiver = raw.check(&field, i)?;
            if receivers.iter().any(|r| r.name == receiver.name) {
                return invalid(
                    format!("{field}.name"),
                    format!("{:?} names another receiver too", receiver.name),
                );
            }
            receivers.push(receiver);
        }
        Ok(receivers)
    }
}

impl RawReceiver {
    fn check(self, field: &str, index: usize) -> Checked<NotifyReceiver> {
        let name = match self.name {
            None => format!("receiver-{index}"),
            Some(name) => {
                let ok = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return invalid(
                        format!("{field}.name"),
                        "up to 63 letters, digits, '-', '_' or '.'",
                    );
                }
                name
            }
        };
        let Some(url) = self.url else {
            return invalid(
                format!("{field}.url"),
                "missing: the receiver's http(s) URL",
            );
        };
        let url = match Url::parse(url.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => url,
            _ => {
                return invalid(
                    format!("{field}.url"),
                    "is not an http(s) URL (the value is not shown)",
                );
            }
        };
        let events = match self.events {
            None => NotifyEvent::ALL.into_iter().collect(),
            Some(list) if list.is_empty() => {
                return invalid(
                    format!("{field}.events"),
                    "an empty list sends nothing; leave it out for every event",
                );
            }
            Some(list) => list.into_iter().collect(),
        };
        let mut headers = HeaderMap::new();
        for (key, value) in self.headers.unwrap_or_default() {
            let Ok(header) = HeaderName::from_bytes(key.as_bytes()) else {
                return invalid(
                    format!("{field}.headers"),
                    format!("{key:?} is not an HTTP header name"),
                );
            };
            let Ok(mut value) = HeaderValue::from_str(&value) else {
                return invalid(
                    format!("{field}.headers.{key}"),
                    "is not a valid header value (the value is not shown)",
                );
            };
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let timeout = match self.timeout {
            None => Duration::from_secs(10),
            Some(text) => parse_duration(&text).map_err(|r| (format!("{field}.timeout"), r))?,
        };
        if timeout.is_zero() {
            return invalid(format!("{field}.timeout"), "must be more than 0s");
        }
        let max_attempts = self.max_attempts.unwrap_or(5);
        if max_attempts == 0 {
            return invalid(format!("{field}.maxAttempts"), "must be at least 1");
        }
        let queue_size = self.queue_size.unwrap_or(100);
        if queue_size == 0 {
            return invalid(format!("{field}.queueSize"), "must be at least 1");
        }
        Ok(NotifyReceiver {
            name,
            url,
            format: self.format.unwrap_or_default(),
            events,
            headers,
            timeout,
            max_attempts,
            queue_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.yaml")
    }

    #[test]
    fn receivers_parse_with_defaults_and_filters() {
        let config = parse(
            r#"
notifications:
  receivers:
    - url: https://example.com/hook
    - name: ops-slack
      url: https://hooks.slack.com/services/T000/B000/XXXXSECRET
      format: slack
      events: [patched, held, warm-up-failed]
      headers: {X-Token: tok-SECRET}
      timeout: 3s
      maxAttempts: 2
      queueSize: 7
"#,
        )
        .unwrap();
        let [plain, slack] = config.notifications.as_slice() else {
            panic!("{:?}", config.notifications);
        };
        assert_eq!(plain.name, "receiver-0");
        assert_eq!(plain.format, NotifyFormat::Json);
        assert_eq!(plain.events.len(), 6);
        assert_eq!(plain.timeout, Duration::from_secs(10));
        assert_eq!((plain.max_attempts, plain.queue_size), (5, 100));
        assert_eq!(slack.name, "ops-slack");
        assert_eq!(slack.format, NotifyFormat::Slack);
        assert_eq!(
            slack.events,
            [
                NotifyEvent::Patched,
                NotifyEvent::Held,
                NotifyEvent::WarmUpFailed
            ]
            .into()
        );
        assert_eq!(slack.headers["x-token"], "tok-SECRET");
        assert_eq!(slack.timeout, Duration::from_secs(3));
        assert_eq!((slack.max_attempts, slack.queue_size), (2, 7));
        // Neither the URL's token nor a header value shows in Debug.
        let debug = format!("{config:?}");
        assert!(!debug.contains("XXXXSECRET") && !debug.contains("tok-SECRET"));
        assert!(debug.contains("ops-slack") && debug.contains("x-token"));
    }

    #[test]
    fn bad_receivers_name_the_field_never_the_value() {
        let error = |text: &str| parse(text).unwrap_err().to_string();
        let e = error("notifications:\n  receivers:\n    - url: ftp://x/SECRET\n");
        assert!(
            e.contains("notifications.receivers[0].url") && !e.contains("SECRET"),
            "{e}"
        );
        let e = error("notifications:\n  receivers:\n    - url: not a url SECRET\n");
        assert!(!e.contains("SECRET"), "{e}");
        let e = error("notifications:\n  receivers:\n    - name: x\n");
        assert!(e.contains("receivers[0].url: missing"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', events: [nope]}\n");
        assert!(e.contains("nope"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', events: []}\n");
        assert!(e.contains("receivers[0].events"), "{e}");
        let e = error(
            "notifications:\n  receivers:\n    - {url: 'http://a', headers: {X-A: \"v\\nSECRET\"}}\n",
        );
        assert!(
            e.contains("receivers[0].headers.X-A") && !e.contains("SECRET"),
            "{e}"
        );
        let e = error(
            "notifications:\n  receivers:\n    - {url: 'http://a', name: a}\n    - {url: 'http://b', name: a}\n",
        );
        assert!(e.contains("receivers[1].name"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', maxAttempts: 0}\n");
        assert!(e.contains("maxAttempts"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', queueSize: 0}\n");
        assert!(e.contains("queueSize"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', timeout: 0s}\n");
        assert!(e.contains("timeout"), "{e}");
        let e = error("notifications:\n  receivers:\n    - {url: 'http://a', name: 'a b'}\n");
        assert!(e.contains("receivers[0].name"), "{e}");
    }
}
