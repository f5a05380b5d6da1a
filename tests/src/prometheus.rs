//! The Prometheus text exposition format, parsed independently of the
//! relay's exporter.

use std::collections::{BTreeMap, BTreeSet};

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `poolrelay_delivery_seconds_bucket`.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// True when every `(name, value)` of `want` is one of its labels.
    pub fn matches(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// Parses Prometheus text format (comments skipped). Panics on a line it
/// cannot read, quoting it.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(
            parse_sample(line).unwrap_or_else(|| panic!("cannot parse the metrics line {line:?}")),
        );
    }
    out
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i + 1);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
        rest = &r[end?..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The sum of the samples named `name` whose labels include `labels`;
/// `None` when there is no such sample.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let sum = samples
        .iter()
        .filter(|s| s.name == name && s.matches(labels))
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(sum)
}

/// The metric family names in a scrape: every sample name, and for
/// histogram and summary series also the name without `_bucket`, `_sum`
/// or `_count`.
pub fn metric_names(samples: &[Sample]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for s in samples {
        names.insert(s.name.clone());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = s.name.strip_suffix(suffix) {
                names.insert(base.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_parsing() {
        let text = "# HELP x y\n# TYPE a_total counter\na_total{pool=\"A\",up=\"h:1\"} 7\n\
                    a_total{pool=\"B\",up=\"h:2\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\n\
                    g{l=\"q\\\"x\"} +Inf\nbare 1 1700000000\n";
        let m = parse_metrics(text);
        assert_eq!(m.len(), 6);
        assert_eq!(metric_sum(&m, "a_total", &[("pool", "A")]), Some(7.0));
        assert_eq!(metric_sum(&m, "a_total", &[]), Some(10.0));
        assert_eq!(metric_sum(&m, "a_total", &[("pool", "C")]), None);
        assert_eq!(m[4].labels["l"], "q\"x");
        assert_eq!(m[4].value, f64::INFINITY);
        assert_eq!(metric_sum(&m, "bare", &[]), Some(1.0));
        let names = metric_names(&m);
        assert!(names.contains("h") && names.contains("h_bucket") && names.contains("a_total"));
    }
}
