//! Wall-clock time for delivery windows, in the zone `server.timezone`
//! names (the system's local zone when absent). The zone is resolved once
//! per config generation, so a reload that changes it moves window edges
//! for the new workers; nothing process-wide (like `TZ`) is touched.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use poolrelay_config::{Config, Window};

/// The zone windows are read in.
#[derive(Debug, Clone)]
pub struct Clock {
    zone: TimeZone,
}

impl Clock {
    /// The clock of a config: its `server.timezone`, else the system zone
    /// (UTC when the system has none, as in a scratch container).
    pub fn of(config: &Config) -> Clock {
        let zone = match &config.server.timezone {
            // Validation already checked the name; a zone database that
            // changed since falls back to the system zone, logged.
            Some(name) => TimeZone::get(name).unwrap_or_else(|e| {
                tracing::warn!(
                    "time zone {name:?} is unavailable ({e}); windows use the system zone"
                );
                TimeZone::system()
            }),
            None => TimeZone::system(),
        };
        Clock { zone }
    }

    /// A clock in a given zone.
    pub fn in_zone(zone: TimeZone) -> Clock {
        Clock { zone }
    }

    /// Minute of the day now, 0..1440.
    pub fn minute_of_day(&self) -> u16 {
        minute_of_day(Timestamp::now(), &self.zone)
    }

    /// Whether `window` is open now (no window: always).
    pub fn is_open(&self, window: Option<Window>) -> bool {
        window.is_none_or(|w| w.contains(self.minute_of_day()))
    }
}

/// Minute of the day of `at` in `zone`.
pub fn minute_of_day(at: Timestamp, zone: &TimeZone) -> u16 {
    let local = at.to_zoned(zone.clone());
    (local.hour() as u16) * 60 + local.minute() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn minutes_follow_the_zone_and_its_daylight_saving_time() {
        let paris = TimeZone::get("Europe/Paris").unwrap();
        // Winter: UTC+1.
        assert_eq!(minute_of_day(at("2026-01-15T23:30:00Z"), &paris), 30);
        // Summer: UTC+2.
        assert_eq!(
            minute_of_day(at("2026-07-15T03:05:00Z"), &paris),
            5 * 60 + 5
        );
        assert_eq!(
            minute_of_day(at("2026-07-15T03:05:00Z"), &TimeZone::UTC),
            3 * 60 + 5
        );
    }

    #[test]
    fn a_window_across_midnight_is_open_on_both_sides() {
        let w = Window {
            start_minute: 22 * 60,
            end_minute: 5 * 60,
        };
        let utc = TimeZone::UTC;
        assert!(w.contains(minute_of_day(at("2026-01-15T23:00:00Z"), &utc)));
        assert!(w.contains(minute_of_day(at("2026-01-15T04:59:00Z"), &utc)));
        assert!(!w.contains(minute_of_day(at("2026-01-15T05:00:00Z"), &utc)));
    }
}
