//! Upstream hosts: name resolution and health. A host that refused, timed
//! out or answered 421 is marked down and skipped; once its backoff has
//! passed, one worker probes it, so a down host costs one probe per backoff
//! interval instead of one timeout per message.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

/// First backoff after a host goes down.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff between probes of a down host.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Down {
    /// No worker tries the host before this instant.
    until: Instant,
    /// Interval to use after the next failure.
    backoff: Duration,
    /// When it went down (Unix ms), for operators.
    since_ms: u64,
    /// The failure that marked it down, for operators.
    reason: String,
}

/// Why a host is down, for `queue list` and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownSince {
    /// When it went down, Unix ms.
    pub since_ms: u64,
    /// The last failure.
    pub reason: String,
}

/// Health of every upstream host by "host:port", shared by all workers.
#[derive(Default)]
pub struct Health {
    down: Mutex<HashMap<String, Down>>,
}

impl Health {
    /// An empty table: every host is presumed up.
    pub fn new() -> Health {
        Health::default()
    }

    /// Whether a worker may use `host` now. For a down host whose backoff has
    /// passed, the first caller gets `true` (it is the probe) and the others
    /// keep skipping it until the probe's outcome is known.
    pub fn claim(&self, host: &str) -> bool {
        let mut map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(host) {
            None => true,
            Some(d) if Instant::now() >= d.until => {
                // Reserve the probe: others wait one more backoff interval.
                d.until = Instant::now() + d.backoff;
                true
            }
            Some(_) => false,
        }
    }

    /// How long until `host` may be tried: zero when it is up or its probe is due.
    pub fn wait(&self, host: &str) -> Duration {
        let map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        map.get(host)
            .map(|d| d.until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Records a connection-level failure of `host` and why.
    pub fn mark_down(&self, host: &str, reason: &str) {
        let mut map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let entry = map.entry(host.to_string()).or_insert(Down {
            until: now,
            backoff: FIRST_BACKOFF,
            since_ms: poolrelay_spool::now_ms(),
            reason: String::new(),
        });
        entry.reason = poolrelay_smtp::reply::clean_text(reason);
        entry.until = now + entry.backoff;
        entry.backoff = (entry.backoff * 2).min(MAX_BACKOFF);
        metrics::gauge!(crate::metric::UPSTREAM_UP.name, "upstream" => host.to_string()).set(0.0);
    }

    /// Publishes `host` as up before anything is known (so the gauge exists from the start).
    pub fn register(&self, host: &str) {
        if self.is_up(host) {
            metrics::gauge!(crate::metric::UPSTREAM_UP.name, "upstream" => host.to_string())
                .set(1.0);
        }
    }

    /// Records that `host` answered.
    pub fn mark_up(&self, host: &str) {
        let mut map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if map.remove(host).is_some() {
            tracing::info!(upstream = %host, "upstream answers again");
        }
        metrics::gauge!(crate::metric::UPSTREAM_UP.name, "upstream" => host.to_string()).set(1.0);
    }

    /// When and why `host` went down; `None` while it is up.
    pub fn down_since(&self, host: &str) -> Option<DownSince> {
        let map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        map.get(host).map(|d| DownSince {
            since_ms: d.since_ms,
            reason: d.reason.clone(),
        })
    }

    /// Whether `host` is currently considered up.
    pub fn is_up(&self, host: &str) -> bool {
        let map = self.down.lock().unwrap_or_else(|e| e.into_inner());
        !map.contains_key(host)
    }
}

/// The one DNS resolver of the process (hickory, with its cache), built on
/// first use from `[server] dns_servers`, or from the system config when
/// that is empty: every lookup shares its cache instead of building a
/// resolver (and re-reading resolv.conf) per lookup.
#[derive(Default)]
pub struct Dns {
    /// The name servers to ask; empty: the system's.
    servers: Vec<SocketAddr>,
    resolver: OnceLock<Result<TokioResolver, String>>,
}

impl Dns {
    /// A resolver asking `servers` (UDP, and TCP for truncated answers),
    /// or the system's name servers when `servers` is empty. Built on
    /// first use.
    pub fn new(servers: &[SocketAddr]) -> Dns {
        Dns {
            servers: servers.to_vec(),
            resolver: OnceLock::new(),
        }
    }

    fn resolver(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_init(|| {
                if self.servers.is_empty() {
                    return TokioResolver::builder_tokio()
                        .map(|b| b.build())
                        .map_err(|e| format!("cannot read the system resolver config: {e}"));
                }
                let mut group = NameServerConfigGroup::with_capacity(2 * self.servers.len());
                for &addr in &self.servers {
                    group.push(NameServerConfig::new(addr, Protocol::Udp));
                    group.push(NameServerConfig::new(addr, Protocol::Tcp));
                }
                let config = ResolverConfig::from_parts(None, Vec::new(), group);
                Ok(
                    TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                        .build(),
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Resolves "host:port" to addresses: the `[server] hosts` map first (so
    /// tests and migrations can point example names at local sinks), then
    /// DNS: the name's MX hosts in preference order when `mx` is set, else
    /// its A/AAAA records. Every address is returned so the caller can try
    /// them all, each with the host name its certificate must carry: the MX
    /// host's name for an MX target (RFC 7672's DANE aside, that is what
    /// can be checked), else the name as written.
    pub async fn resolve(
        &self,
        host_port: &str,
        hosts: &BTreeMap<String, String>,
        mx: bool,
    ) -> Result<Vec<(String, SocketAddr)>, String> {
        if let Ok(addr) = host_port.parse::<SocketAddr>() {
            return Ok(vec![(addr.ip().to_string(), addr)]);
        }
        let (name, port) = split_host_port(host_port)?;
        if let Some(mapped) = hosts.get(&name.to_ascii_lowercase()) {
            if let Ok(addr) = mapped.parse::<SocketAddr>() {
                return Ok(vec![(name, addr)]);
            }
            if let Ok(ip) = mapped.parse::<std::net::IpAddr>() {
                return Ok(vec![(name, SocketAddr::new(ip, port))]);
            }
            return Err(format!(
                "[server] hosts maps {name} to {mapped:?}, which is neither an IP nor IP:port"
            ));
        }
        let resolver = self.resolver()?;
        let mut targets = Vec::new();
        if mx {
            let lookup = resolver
                .mx_lookup(name.as_str())
                .await
                .map_err(|e| format!("MX lookup of {name} failed: {e}"))?;
            let mut records: Vec<(u16, String)> = lookup
                .iter()
                .map(|r| {
                    (
                        r.preference(),
                        r.exchange().to_utf8().trim_end_matches('.').to_string(),
                    )
                })
                .collect();
            records.sort();
            targets.extend(records.into_iter().map(|(_, host)| host));
        }
        if targets.is_empty() {
            // No MX (or not asked): the name itself (RFC 5321 §5.1 implicit MX).
            targets.push(name.clone());
        }
        let mut addrs = Vec::new();
        for target in &targets {
            match resolver.lookup_ip(target.as_str()).await {
                Ok(ips) => addrs.extend(
                    ips.iter()
                        .map(|ip| (target.clone(), SocketAddr::new(ip, port))),
                ),
                Err(e) => tracing::debug!("cannot resolve {target}: {e}"),
            }
        }
        if addrs.is_empty() {
            return Err(format!(
                "{name} has no address (tried {})",
                targets.join(", ")
            ));
        }
        Ok(addrs)
    }
}

fn split_host_port(host_port: &str) -> Result<(String, u16), String> {
    let (name, port) = host_port
        .rsplit_once(':')
        .ok_or_else(|| format!("upstream {host_port:?} has no port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("upstream {host_port:?} has a bad port"))?;
    Ok((name.trim_matches(['[', ']']).to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_host_is_probed_by_one_worker_per_backoff() {
        let h = Health::new();
        assert!(h.claim("a:25"));
        h.mark_down("a:25", "refused");
        assert!(!h.claim("a:25"), "skipped while backing off");
        assert!(!h.is_up("a:25"));
        assert_eq!(
            h.down_since("a:25").map(|d| d.reason),
            Some("refused".into())
        );
        h.mark_up("a:25");
        assert!(h.claim("a:25"));
        assert_eq!(h.down_since("a:25"), None);
    }

    #[tokio::test]
    async fn hosts_map_overrides_dns() {
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "scooby.example.org".to_string(),
            "127.0.0.9:2600".to_string(),
        );
        hosts.insert("scrappy.example.org".to_string(), "127.0.0.8".to_string());
        let dns = Dns::new(&[]);
        assert_eq!(
            dns.resolve("scooby.example.org:25", &hosts, false).await,
            Ok(vec![(
                "scooby.example.org".to_string(),
                "127.0.0.9:2600".parse().unwrap()
            )])
        );
        assert_eq!(
            dns.resolve("scrappy.example.org:25", &hosts, false).await,
            Ok(vec![(
                "scrappy.example.org".to_string(),
                "127.0.0.8:25".parse().unwrap()
            )])
        );
        assert_eq!(
            dns.resolve("127.0.0.1:26", &hosts, false).await,
            Ok(vec![(
                "127.0.0.1".to_string(),
                "127.0.0.1:26".parse().unwrap()
            )])
        );
    }
}
