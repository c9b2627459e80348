//! Durations and byte sizes as people write them on command lines and in
//! configuration, and byte counts as people read them: one meaning for the agent, the
//! coordinator and the sandbox.

use std::time::Duration;

/// Parses a duration: `30s`, `5m`, `1h30m`, `2h 15m` (jiff's friendly format); never
/// negative.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 1h30m: {e}"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?}: must not be negative"))
}

/// Parses a byte size: a number, optionally followed by a unit. `k`/`K`, `M`, `G`, `T`
/// are powers of 1000 (SI, as Kubernetes quantities read them); `Ki`, `Mi`, `Gi`, `Ti`
/// are powers of 1024; a trailing `B` is allowed (`500MB`, `2GiB`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 2GiB or 500M"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let factor: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" | "ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown size unit {unit:?} (use k, M, G, T or Ki, Mi, Gi, Ti)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A byte count for people: `512 B`, `1.5 KiB`, `1.2 GiB` (one decimal from KiB on).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // f64 is exact enough for one decimal.
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in UNITS.iter().skip(1) {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 1m30s "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h 15m"), Ok(Duration::from_secs(8100)));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes_are_si_without_i_and_binary_with_it() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("32MiB"), Ok(32 << 20));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("5TB"), Ok(5_000_000_000_000));
        assert_eq!(
            parse_bytes("1k"),
            Ok(1000),
            "k is 1000, as in Kubernetes quantities"
        );
        assert_eq!(parse_bytes("10 KiB"), Ok(10240));
        assert!(parse_bytes("lots").is_err());
        assert!(
            parse_bytes("3XB")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(
            parse_bytes("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn bytes_read_like_people_want_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(32 << 20), "32.0 MiB");
        assert_eq!(human_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
