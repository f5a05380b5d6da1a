//! The `[spool]` table: which store keeps the queue.

use super::*;
use crate::{JetStream, SpoolBackend};

/// `spool.replicas` when the config gives none.
const DEFAULT_REPLICAS: usize = 3;
/// JetStream allows at most five replicas of a stream.
const MAX_REPLICAS: i64 = 5;

impl Ctx<'_> {
    pub(super) fn spool(&mut self, raw: Option<Located<crate::raw::RawSpool>>) -> SpoolBackend {
        let Some(raw) = raw.map(|r| r.value) else {
            return SpoolBackend::Fjall;
        };
        let jetstream_keys = [
            raw.servers.as_ref().map(|v| ("servers", v.span())),
            raw.replicas.as_ref().map(|v| ("replicas", v.span())),
            raw.stream_prefix
                .as_ref()
                .map(|v| ("stream_prefix", v.span())),
            raw.ack_timeout.as_ref().map(|v| ("ack_timeout", v.span())),
            raw.credentials_file
                .as_ref()
                .map(|v| ("credentials_file", v.span())),
            raw.tls_ca_file.as_ref().map(|v| ("tls_ca_file", v.span())),
        ];
        let backend = raw.backend.as_ref().map(|v| v.get_ref().as_str());
        match backend {
            None | Some("fjall") => {
                if let Some((key, span)) = jetstream_keys.into_iter().flatten().next() {
                    let line = self.line(&span);
                    self.at_line(
                        line,
                        format!("spool.{key} applies to backend = \"jetstream\" only; add backend = \"jetstream\" to [spool], or remove {key}"),
                    );
                }
                return SpoolBackend::Fjall;
            }
            Some("jetstream") => {}
            Some(other) => {
                let msg = format!(
                    "spool backend \"{other}\" is unknown; write backend = \"fjall\" (the embedded store, the default) or backend = \"jetstream\" (a NATS JetStream cluster)"
                );
                if let Some(v) = &raw.backend {
                    self.at(v, msg);
                }
                return SpoolBackend::Fjall;
            }
        }
        let mut js = JetStream {
            servers: Vec::new(),
            replicas: DEFAULT_REPLICAS,
            stream_prefix: "poolrelay".to_string(),
            ack_timeout: Duration::from_secs(5),
            credentials_file: None,
            tls_ca_file: None,
        };
        match &raw.servers {
            None => {
                if let Some(v) = &raw.backend {
                    self.at(
                        v,
                        "spool backend = \"jetstream\" needs servers; add servers = [\"nats://n1:4222\", \"nats://n2:4222\", \"nats://n3:4222\"] to [spool]".to_string(),
                    );
                }
            }
            Some(list) if list.get_ref().is_empty() => self.at(
                list,
                "spool.servers is empty; list the cluster's servers, e.g. servers = [\"nats://n1:4222\", \"nats://n2:4222\", \"nats://n3:4222\"]".to_string(),
            ),
            Some(list) => {
                for v in list.get_ref() {
                    match nats_url(v.get_ref()) {
                        Ok(url) => js.servers.push(url),
                        Err(why) => self.at(v, format!("spool.servers: \"{}\" {why}", v.get_ref())),
                    }
                }
            }
        }
        if let Some(v) = &raw.replicas {
            let n = *v.get_ref();
            if (1..=MAX_REPLICAS).contains(&n) {
                js.replicas = n as usize;
            } else {
                self.at(
                    v,
                    format!("spool.replicas = {n} is out of range; write 1 to {MAX_REPLICAS} (3 survives the loss of one server)"),
                );
            }
        }
        if let Some(v) = &raw.stream_prefix {
            let p = v.get_ref();
            if !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                js.stream_prefix = p.clone();
            } else {
                self.at(
                    v,
                    format!("spool.stream_prefix \"{p}\" may hold only letters, digits, _ and - (it names streams, buckets and subjects); write e.g. stream_prefix = \"poolrelay\""),
                );
            }
        }
        if let Some(v) = &raw.ack_timeout
            && let Some(d) = self.positive_duration("spool.ack_timeout", v)
        {
            js.ack_timeout = d;
        }
        if let Some(v) = &raw.credentials_file {
            js.credentials_file = self.path("spool.credentials_file", v);
        }
        if let Some(v) = &raw.tls_ca_file {
            js.tls_ca_file = self.path("spool.tls_ca_file", v);
        }
        SpoolBackend::JetStream(js)
    }
}

/// A NATS server URL: `nats://` or `tls://`, a host and a port.
fn nats_url(text: &str) -> Result<String, String> {
    const FORM: &str = "write nats://HOST:PORT (or tls://HOST:PORT), e.g. \"nats://10.0.0.1:4222\"";
    let text = text.trim();
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!("has no scheme; {FORM}"));
    };
    if scheme != "nats" && scheme != "tls" {
        return Err(format!("has scheme {scheme}://; {FORM}"));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("has no port; {FORM}"));
    };
    let host_ok =
        is_ip_or_socket(host.trim_start_matches('[').trim_end_matches(']')) || is_host_name(host);
    if !host_ok {
        return Err(format!("has no valid host; {FORM}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("{scheme}://{host}:{p}")),
        _ => Err(format!("has no valid port; {FORM}")),
    }
}

#[cfg(test)]
mod tests {
    use super::nats_url;

    #[test]
    fn nats_urls_need_a_scheme_a_host_and_a_port() {
        assert_eq!(nats_url("nats://n1:4222").as_deref(), Ok("nats://n1:4222"));
        assert_eq!(
            nats_url("tls://10.0.0.1:4222").as_deref(),
            Ok("tls://10.0.0.1:4222")
        );
        assert_eq!(
            nats_url("nats://[::1]:4222").as_deref(),
            Ok("nats://[::1]:4222")
        );
        assert!(nats_url("n1:4222").is_err());
        assert!(nats_url("http://n1:4222").is_err());
        assert!(nats_url("nats://n1").is_err());
        assert!(nats_url("nats://n1:0").is_err());
        assert!(nats_url("nats://bad host:4222").is_err());
    }
}
