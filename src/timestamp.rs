//! Points in time as IoT Hub writes them: ISO-8601 UTC with seven fractional digits, and
//! `0001-01-01T00:00:00Z` for "never".

use std::fmt;
use time::OffsetDateTime;

/// A UTC instant, or "never".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(Option<OffsetDateTime>);

impl Timestamp {
    /// The value IoT Hub shows for something that has not happened yet.
    pub const NEVER: Self = Self(None);

    /// Now, to the 100 ns tick that IoT Hub's timestamps carry, so that a written timestamp
    /// reads back equal.
    pub fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        let ticks = now.nanosecond() / 100 * 100;
        Self(Some(now.replace_nanosecond(ticks).unwrap_or(now)))
    }

    /// The instant `millis` milliseconds after the unix epoch.
    pub fn from_unix_millis(millis: i64) -> Self {
        Self(OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok())
    }

    /// Milliseconds since the unix epoch (0 for never).
    pub fn unix_millis(self) -> i64 {
        self.0
            .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// Seconds since the unix epoch (0 for never).
    pub fn unix_seconds(self) -> i64 {
        self.0.map_or(0, OffsetDateTime::unix_timestamp)
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Self {
        let t = OffsetDateTime::from(t);
        Self(Some(
            t.replace_nanosecond(t.nanosecond() / 100 * 100)
                .unwrap_or(t),
        ))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(t) = self.0 else {
            return f.write_str("0001-01-01T00:00:00Z");
        };
        // Seven fractional digits (100 ns ticks), as .NET's round-trip format writes them.
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond() / 100
        )
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == Self::NEVER.to_string() {
            return Ok(Self::NEVER);
        }
        OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map(|t| Self(Some(t)))
            .map_err(serde::de::Error::custom)
    }
}

/// Current unix time in seconds, for token expiry checks.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn round_trips_through_serde() {
        for t in [Timestamp::NEVER, Timestamp::now()] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        }
    }

    #[test]
    fn formats_like_iot_hub() {
        assert_eq!(Timestamp::NEVER.to_string(), "0001-01-01T00:00:00Z");
        let t = Timestamp(Some(datetime!(2023-02-17 21:26:10.583_563_3 UTC)));
        assert_eq!(t.to_string(), "2023-02-17T21:26:10.5835633Z");
    }
}
