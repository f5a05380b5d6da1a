//! Parsers and formatters for the unit strings of the config: sizes,
//! durations, bandwidths, time windows and upstream host names.
//!
//! Every parser returns `Err` with a message that quotes the input and lists
//! the accepted forms, so callers can show it as is (after a key name).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::{MtPriorityRange, Window};

/// A decimal number split into its integer part and its fraction digits.
struct Decimal<'a> {
    whole: &'a str,
    fraction: &'a str,
}

/// Splits `s` into a leading unsigned decimal number and the rest (trimmed).
fn split_number(s: &str) -> Option<(Decimal<'_>, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, rest) = s.split_at(end);
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || fraction.contains('.') || (number.ends_with('.')) {
        return None;
    }
    Some((Decimal { whole, fraction }, rest.trim()))
}

/// `number * unit`, exact for integers, rounded down for fractions; `None` on overflow.
fn scale(n: &Decimal<'_>, unit: u128) -> Option<u128> {
    let whole: u128 = n.whole.parse().ok()?;
    let mut value = whole.checked_mul(unit)?;
    if !n.fraction.is_empty() {
        let digits = u32::try_from(n.fraction.len()).ok()?;
        if digits > 30 {
            return None;
        }
        let frac: u128 = n.fraction.parse().ok()?;
        let denom = 10u128.checked_pow(digits)?;
        value = value.checked_add(frac.checked_mul(unit)? / denom)?;
    }
    Some(value)
}

const SIZE_FORMS: &str = "write a number of bytes with an optional unit B, KB, MB, GB or TB \
     (powers of 1024; KiB, MiB, ... also accepted), e.g. \"50MB\", \"512KB\", \"1GB\" or \"100B\"";

/// Parses a size in bytes: `"50MB"`, `"512KB"`, `"1GB"`, `"100B"`, or plain
/// digits (bytes). K, M, G and T are powers of 1024; case-insensitive; an
/// optional `i` (`"MiB"`) and a final `B` are accepted; decimals such as
/// `"1.5GB"` are rounded down to whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("\"{s}\" is not a size; {SIZE_FORMS}");
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let factor: u128 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = scale(&n, factor).ok_or_else(|| format!("\"{s}\" is too large for a size"))?;
    u64::try_from(bytes).map_err(|_| format!("\"{s}\" is too large for a size"))
}

const DURATION_FORMS: &str = "write a number and a unit ms, s, m, h, d or w with no space, \
     e.g. \"500ms\", \"30s\", \"5m\", \"1h\", \"5d\" or \"1w\" (a bare number means seconds)";

const SEC: u128 = 1_000_000_000;

/// The duration units and their length in nanoseconds.
const DURATION_UNITS: [(&str, u128); 6] = [
    ("ms", 1_000_000),
    ("s", SEC),
    ("m", 60 * SEC),
    ("h", 3600 * SEC),
    ("d", 86_400 * SEC),
    ("w", 7 * 86_400 * SEC),
];

/// Unit words people write, with the unit to write instead; only for the
/// error message, so that `"5 days"` is answered with `"5d"`.
const DURATION_WORDS: [(&str, &str); 20] = [
    ("msec", "ms"),
    ("msecs", "ms"),
    ("millisecond", "ms"),
    ("milliseconds", "ms"),
    ("sec", "s"),
    ("secs", "s"),
    ("second", "s"),
    ("seconds", "s"),
    ("min", "m"),
    ("mins", "m"),
    ("minute", "m"),
    ("minutes", "m"),
    ("hr", "h"),
    ("hrs", "h"),
    ("hour", "h"),
    ("hours", "h"),
    ("day", "d"),
    ("days", "d"),
    ("week", "w"),
    ("weeks", "w"),
];

/// Parses a duration: a number and a unit `ms`, `s`, `m`, `h`, `d` or `w`
/// with nothing between them (`"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"5d"`,
/// `"1w"`), or a bare number of seconds. Units are case-insensitive and
/// decimals (`"1.5h"`) are accepted. Spaces and unit words (`"5 days"`) are
/// refused, with the short form to write instead.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || match suggest_duration(s) {
        Some(fix) => format!(
            "\"{s}\" is not a duration; write \"{fix}\" (a number and a unit ms, s, m, h, d or w, with no space)"
        ),
        None => format!("\"{s}\" is not a duration; {DURATION_FORMS}"),
    };
    if s.contains(char::is_whitespace) {
        return Err(bad());
    }
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let unit = unit.to_ascii_lowercase();
    let nanos_per_unit = if unit.is_empty() {
        SEC
    } else {
        DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, nanos)| nanos)
            .ok_or_else(bad)?
    };
    let too_long = || format!("\"{s}\" is too long for a duration");
    let nanos = scale(&n, nanos_per_unit).ok_or_else(too_long)?;
    let secs = u64::try_from(nanos / SEC).map_err(|_| too_long())?;
    let sub = u32::try_from(nanos % SEC).map_err(|_| too_long())?;
    Ok(Duration::new(secs, sub))
}

/// The accepted spelling of a duration written with a space or a unit word
/// (`"5 days"`, `"5 d"`, `"2hours"` -> `"5d"`, `"5d"`, `"2h"`), if it is one.
fn suggest_duration(s: &str) -> Option<String> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let compact = match words.as_slice() {
        [one] => (*one).to_string(),
        [number, unit] => format!("{number}{unit}"),
        _ => return None,
    };
    let end = compact
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(compact.len());
    let (number, unit) = compact.split_at(end);
    let unit = unit.to_ascii_lowercase();
    let short = if unit.is_empty() {
        ""
    } else {
        DURATION_UNITS
            .iter()
            .map(|&(name, _)| name)
            .find(|name| *name == unit)
            .or_else(|| {
                DURATION_WORDS
                    .iter()
                    .find(|(word, _)| *word == unit)
                    .map(|&(_, name)| name)
            })?
    };
    let fix = format!("{number}{short}");
    (fix != s && split_number(&fix).is_some()).then_some(fix)
}

/// Formats a duration in the largest unit that represents it exactly
/// (`"5d"`, `"1h"`, `"90s"`, `"500ms"`); the inverse of [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (7 * 86_400_000_000_000, "w"),
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, name) in UNITS {
        if nanos.is_multiple_of(unit) {
            return format!("{}{name}", nanos / unit);
        }
    }
    format!("{}s", decimal(nanos, 1_000_000_000))
}

/// `value / unit` as an exact decimal with trailing zeros trimmed (`unit` a power of ten).
fn decimal(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let rem = value % unit;
    if rem == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let frac = format!("{rem:0width$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Formats a size in the largest power-of-1024 unit that represents it
/// exactly (`"50MB"`, `"512KB"`, `"100B"`); the inverse of [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TB"),
        (1 << 30, "GB"),
        (1 << 20, "MB"),
        (1 << 10, "KB"),
    ];
    for (unit, name) in UNITS {
        if bytes != 0 && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

const BANDWIDTH_FORMS: &str = "write bits per second with a unit bps, kbps, Mbps or Gbps \
     (multiples of 1000), e.g. \"12Mbps\", \"1.5Mbps\", \"150kbps\" or \"800bps\"";

/// Parses a bandwidth in bits per second: `"12Mbps"`, `"1.5Mbps"`,
/// `"150kbps"`, `"1Gbps"`, `"800bps"`; k, M, G and T are multiples of 1000;
/// case-insensitive; `"bit/s"` is accepted for `"bps"`; a bare number is bits per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let bad = || format!("\"{s}\" is not a bandwidth; {BANDWIDTH_FORMS}");
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let unit = unit.to_ascii_lowercase();
    let prefix = if unit.is_empty() {
        ""
    } else {
        unit.strip_suffix("bps")
            .or_else(|| unit.strip_suffix("bit/s"))
            .ok_or_else(bad)?
    };
    let factor: u128 = match prefix {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let too_large = || format!("\"{s}\" is too large for a bandwidth");
    let bps = scale(&n, factor).ok_or_else(too_large)?;
    u64::try_from(bps).map_err(|_| too_large())
}

/// Formats bits per second with the largest 1000-multiple unit, exactly
/// (`"12Mbps"`, `"1.5Mbps"`, `"800bps"`); the inverse of [`parse_bandwidth`].
pub fn format_bandwidth(bps: u64) -> String {
    const UNITS: [(u128, &str); 4] = [
        (1_000_000_000_000, "Tbps"),
        (1_000_000_000, "Gbps"),
        (1_000_000, "Mbps"),
        (1_000, "kbps"),
    ];
    let v = u128::from(bps);
    for (unit, name) in UNITS {
        if v >= unit {
            return format!("{}{name}", decimal(v, unit));
        }
    }
    format!("{bps}bps")
}

const WINDOW_FORMS: &str = "write \"hh:mm-hh:mm\" in 24-hour local time, e.g. \"00:00-05:00\" \
     or \"22:00-06:00\" (crossing midnight is fine; \"24:00\" may end a window)";

/// Parses a time-of-day window `"hh:mm-hh:mm"` (24-hour clock; the end is
/// exclusive and may be `24:00`; a window may cross midnight, e.g.
/// `"22:00-06:00"`; start and end must differ).
pub fn parse_window(s: &str) -> Result<Window, String> {
    let bad = || format!("\"{s}\" is not a time window; {WINDOW_FORMS}");
    let (start, end) = s.split_once('-').ok_or_else(bad)?;
    let start_minute = parse_time_of_day(start, false).ok_or_else(bad)?;
    let end_minute = parse_time_of_day(end, true).ok_or_else(bad)?;
    if start_minute == end_minute {
        return Err(format!(
            "time window \"{s}\" starts and ends at the same time; {WINDOW_FORMS}, \
             or omit the window to use the host all day"
        ));
    }
    Ok(Window {
        start_minute,
        end_minute,
    })
}

/// `"hh:mm"` to minutes after midnight; `24:00` only when `end`.
fn parse_time_of_day(s: &str, end: bool) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) if end => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

impl Window {
    /// Whether `minute_of_day` (0..1440, minutes after local midnight) falls
    /// inside the window: start inclusive, end exclusive, crossing midnight
    /// when the end is before the start. A window whose start equals its end
    /// is empty (the parser never produces one).
    pub fn contains(&self, minute_of_day: u16) -> bool {
        let m = minute_of_day;
        if self.start_minute <= self.end_minute {
            self.start_minute <= m && m < self.end_minute
        } else {
            m >= self.start_minute || m < self.end_minute
        }
    }
}

impl std::fmt::Display for Window {
    /// `hh:mm-hh:mm`, as written in the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_minute / 60,
            self.start_minute % 60,
            self.end_minute / 60,
            self.end_minute % 60
        )
    }
}

impl std::str::FromStr for Window {
    type Err = String;

    /// Same as [`parse_window`].
    fn from_str(s: &str) -> Result<Window, String> {
        parse_window(s)
    }
}

const HOST_FORMS: &str = "write \"name\", \"name:port\", \"192.0.2.1\", \"192.0.2.1:25\" \
     or \"[2001:db8::1]:25\" (the port defaults to 25)";

/// Normalises an upstream host to `"host:port"`: accepts `"name"`,
/// `"name:port"`, `"ip"`, `"ip:port"`, `"[v6]"`, `"[v6]:port"` and a bare
/// IPv6 address; the port defaults to 25; names are lowercased and a
/// trailing dot is dropped; IPv6 addresses are bracketed.
pub fn normalize_host(s: &str) -> Result<String, String> {
    let bad = |why: &str| format!("\"{s}\" is not a host{why}; {HOST_FORMS}");
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("the host is empty; {HOST_FORMS}"));
    }
    if let Some(rest) = t.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(|| bad(" (missing ']')"))?;
        let ip: Ipv6Addr = addr
            .parse()
            .map_err(|_| bad(" (not an IPv6 address inside [ ])"))?;
        let port = match after {
            "" => 25,
            p => parse_port(p.strip_prefix(':').ok_or_else(|| bad(""))?)
                .ok_or_else(|| bad(" (bad port)"))?,
        };
        return Ok(format!("[{ip}]:{port}"));
    }
    if let Ok(ip) = t.parse::<Ipv6Addr>() {
        return Ok(format!("[{ip}]:25"));
    }
    let (name, port) = match t.split_once(':') {
        Some((n, p)) => (
            n,
            parse_port(p).ok_or_else(|| bad(" (bad port: use 1-65535)"))?,
        ),
        None => (t, 25),
    };
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(format!("{ip}:{port}"));
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if !is_host_name(&name) {
        return Err(bad(""));
    }
    Ok(format!("{name}:{port}"))
}

/// A port number 1-65535.
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&p| p != 0)
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, not
/// starting or ending with `-`, at most 63 bytes each and 253 in all.
pub(crate) fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether `s` is an IP address or an IP socket address (`"ip"`, `"ip:port"`, `"[v6]:port"`).
pub(crate) fn is_ip_or_socket(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || s.parse::<std::net::SocketAddr>().is_ok()
}

const MT_PRIORITY_FORMS: &str = "write a value from -9 to 9 (\"5\"), a bound (\">= 5\", \"<= -1\", \"> 0\", \"< 0\") or a range (\"3..9\")";

/// Parses a route's `mt_priority` matcher: `"5"`, `">= 5"`, `"<= -1"`,
/// `"> 0"`, `"< 0"` or `"3..9"` (inclusive), values from -9 to 9.
pub fn parse_mt_priority_range(s: &str) -> Result<MtPriorityRange, String> {
    let bad = || format!("\"{s}\" is not an MT-PRIORITY matcher; {MT_PRIORITY_FORMS}");
    let value = |t: &str| -> Result<i8, String> {
        let t = t.trim();
        let v: i64 = t.parse().map_err(|_| bad())?;
        if !(-9..=9).contains(&v) {
            return Err(format!(
                "{v} in \"{s}\" is outside -9..9, the MT-PRIORITY range; {MT_PRIORITY_FORMS}"
            ));
        }
        Ok(v as i8)
    };
    let t = s.trim();
    let (min, max) = if let Some(rest) = t.strip_prefix(">=") {
        (value(rest)?, 9)
    } else if let Some(rest) = t.strip_prefix("<=") {
        (-9, value(rest)?)
    } else if let Some(rest) = t.strip_prefix('>') {
        (value(rest)?.saturating_add(1), 9)
    } else if let Some(rest) = t.strip_prefix('<') {
        (-9, value(rest)?.saturating_sub(1))
    } else if let Some((a, b)) = t.split_once("..") {
        (value(a)?, value(b.strip_prefix('=').unwrap_or(b))?)
    } else {
        let v = value(t)?;
        (v, v)
    };
    if min > max {
        return Err(format!(
            "\"{s}\" matches no MT-PRIORITY value; {MT_PRIORITY_FORMS}"
        ));
    }
    Ok(MtPriorityRange { min, max })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Ok(50 << 20));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("10mib"), Ok(10 << 20));
        assert_eq!(parse_size("10 MiB"), Ok(10 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1.5KB"), Ok(1536));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "MB",
            "50XB",
            "-1",
            "1.2.3MB",
            "5.MB",
            "1e3",
            "99999999999999999999TB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(bad) || e.contains("too large"), "{bad}: {e}");
        }
        assert!(parse_size("50XB").unwrap_err().contains("\"50MB\""));
        for n in [0, 100, 1024, 50 << 20, 3 << 30, 12345] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{}", format_size(n));
        }
        assert_eq!(format_size(50 << 20), "50MB");
    }

    #[test]
    fn durations() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(s(30)));
        assert_eq!(parse_duration("5m"), Ok(s(300)));
        assert_eq!(parse_duration("1h"), Ok(s(3600)));
        assert_eq!(parse_duration("5d"), Ok(s(5 * 86400)));
        assert_eq!(parse_duration("1w"), Ok(s(7 * 86400)));
        assert_eq!(parse_duration("45"), Ok(s(45)));
        assert_eq!(parse_duration("1.5h"), Ok(s(5400)));
        assert_eq!(parse_duration("10M"), Ok(s(600)));
        for bad in ["", "5x", "m", "-5s", "5 m s", "1y"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("\"5m\""), "{bad}: {e}");
        }
        for d in [
            s(0),
            s(30),
            s(90),
            s(300),
            s(3600),
            s(5 * 86400),
            s(14 * 86400),
            Duration::from_millis(1500),
            Duration::from_nanos(1_000_000_001),
        ] {
            assert_eq!(
                parse_duration(&format_duration(d)),
                Ok(d),
                "{}",
                format_duration(d)
            );
        }
        assert_eq!(format_duration(s(300)), "5m");
        assert_eq!(format_duration(s(5 * 86400)), "5d");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn durations_with_spaces_or_words_suggest_the_short_form() {
        let fix = |bad: &str| {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("\"{bad}\" is not a duration")),
                "{e}"
            );
            e
        };
        for (bad, short) in [
            ("5 days", "5d"),
            ("5 day", "5d"),
            ("5days", "5d"),
            ("5 d", "5d"),
            ("2 Hours", "2h"),
            ("30 sec", "30s"),
            ("1.5 minutes", "1.5m"),
            ("1 week", "1w"),
            ("500 msec", "500ms"),
            (" 5m", "5m"),
            ("45 ", "45"),
        ] {
            let e = fix(bad);
            assert!(e.contains(&format!("write \"{short}\"")), "{bad}: {e}");
        }
        for bad in ["5 m s", "five days", "5 fortnights", "1y"] {
            let e = fix(bad);
            assert!(!e.contains("write \"5"), "{bad}: {e}");
            assert!(e.contains("\"5d\""), "{bad}: {e}");
        }
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("12Mbps"), Ok(12_000_000));
        assert_eq!(parse_bandwidth("1.5Mbps"), Ok(1_500_000));
        assert_eq!(parse_bandwidth("150kbps"), Ok(150_000));
        assert_eq!(parse_bandwidth("150KBPS"), Ok(150_000));
        assert_eq!(parse_bandwidth("1Gbps"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("800bps"), Ok(800));
        assert_eq!(parse_bandwidth("800"), Ok(800));
        assert_eq!(parse_bandwidth("2 Mbit/s"), Ok(2_000_000));
        for bad in ["", "12M", "12Mb", "fast", "1.5.1Mbps", "12Xbps"] {
            let e = parse_bandwidth(bad).unwrap_err();
            assert!(e.contains("\"1.5Mbps\""), "{bad}: {e}");
        }
        for n in [
            800,
            150_000,
            1_500_000,
            12_000_000,
            1_000_000_000,
            1_234_567,
        ] {
            assert_eq!(
                parse_bandwidth(&format_bandwidth(n)),
                Ok(n),
                "{}",
                format_bandwidth(n)
            );
        }
        assert_eq!(format_bandwidth(1_500_000), "1.5Mbps");
    }

    #[test]
    fn windows() {
        let w = parse_window("00:00-05:00").unwrap();
        assert_eq!((w.start_minute, w.end_minute), (0, 300));
        assert!(w.contains(0) && w.contains(299) && !w.contains(300) && !w.contains(1439));
        let night = parse_window("22:30-06:15").unwrap();
        assert_eq!((night.start_minute, night.end_minute), (1350, 375));
        assert!(night.contains(1350) && night.contains(1439) && night.contains(0));
        assert!(night.contains(374) && !night.contains(375) && !night.contains(1349));
        assert!(!night.contains(720));
        let all_day = parse_window("0:00 - 24:00").unwrap();
        assert!(all_day.contains(0) && all_day.contains(1439));
        assert_eq!(all_day.to_string(), "00:00-24:00");
        assert_eq!(night.to_string(), "22:30-06:15");
        assert!(
            parse_window("05:00-05:00")
                .unwrap_err()
                .contains("same time")
        );
        for bad in [
            "",
            "5-6",
            "24:00-01:00",
            "00:60-01:00",
            "1:2-3:4",
            "00:00",
            "aa:bb-cc:dd",
        ] {
            let e = parse_window(bad).unwrap_err();
            assert!(e.contains("hh:mm-hh:mm"), "{bad}: {e}");
        }
    }

    #[test]
    fn hosts() {
        let n = |s| normalize_host(s);
        assert_eq!(n("SCOOBY.Example.ORG"), Ok("scooby.example.org:25".into()));
        assert_eq!(n("scooby.example.org."), Ok("scooby.example.org:25".into()));
        assert_eq!(n("mx:2525"), Ok("mx:2525".into()));
        assert_eq!(n("192.0.2.1"), Ok("192.0.2.1:25".into()));
        assert_eq!(n("192.0.2.1:587"), Ok("192.0.2.1:587".into()));
        assert_eq!(n("[2001:DB8::1]:26"), Ok("[2001:db8::1]:26".into()));
        assert_eq!(n("[::1]"), Ok("[::1]:25".into()));
        assert_eq!(n("::1"), Ok("[::1]:25".into()));
        for bad in [
            "",
            "a b",
            "host:0",
            "host:99999",
            "host:",
            "[::1",
            "[nope]:25",
            "-x.org",
            "a..b",
            "h:1:2x",
        ] {
            let e = n(bad).unwrap_err();
            assert!(e.contains("name:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn mt_priority_ranges() {
        let r = |s: &str| parse_mt_priority_range(s).map(|r| (r.min, r.max));
        assert_eq!(r(">= 5"), Ok((5, 9)));
        assert_eq!(r(">=5"), Ok((5, 9)));
        assert_eq!(r("<= -1"), Ok((-9, -1)));
        assert_eq!(r("> 0"), Ok((1, 9)));
        assert_eq!(r("< 0"), Ok((-9, -1)));
        assert_eq!(r("3..9"), Ok((3, 9)));
        assert_eq!(r("-2..=2"), Ok((-2, 2)));
        assert_eq!(r(" 5 "), Ok((5, 5)));
        assert_eq!(r("-9"), Ok((-9, -9)));
        for bad in [
            "", "high", ">= 12", "5..3", "> 9", "< -9", "..", "1..", "=> 5",
        ] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert!(r(">= 12").unwrap_err().contains("outside -9..9"));
    }
}
