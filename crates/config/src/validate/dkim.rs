//! `[[dkim]]` entries and the pools' `arc_seal`: keys read and checked
//! (size, algorithm, permissions) so a bad key is a config error at start
//! or reload, never a signing failure per message.

use super::*;
use crate::dkim::{DEFAULT_DKIM_HEADERS, MIN_RSA_BITS, read_key};
use crate::{Dkim, DkimAlgorithm, DkimKey};

impl Ctx<'_> {
    pub(super) fn dkim(
        &mut self,
        raw: Option<Vec<Spanned<crate::raw::RawDkim>>>,
        pools: &BTreeMap<String, Pool>,
    ) -> Vec<Dkim> {
        let mut out: Vec<Dkim> = Vec::new();
        for item in raw.iter().flatten() {
            let line = self.line(&item.span());
            let r = item.get_ref();
            let domain = r
                .domain
                .get_ref()
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if !is_host_name(&domain) || !domain.contains('.') {
                self.at(&r.domain, format!("dkim domain \"{}\" is not a domain name; write the domain that signs, e.g. domain = \"example.org\"", r.domain.get_ref()));
                continue;
            }
            let selector = r.selector.get_ref().trim().to_string();
            if selector.is_empty()
                || !selector.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                self.at(&r.selector, format!("dkim selector \"{}\" is not a DNS label; write letters, digits and -, e.g. selector = \"list2026\"", r.selector.get_ref()));
                continue;
            }
            let algorithm = match r.algorithm.as_ref().map(|a| a.get_ref().as_str()) {
                None | Some("rsa-sha256") => DkimAlgorithm::RsaSha256,
                Some("ed25519-sha256") => DkimAlgorithm::Ed25519Sha256,
                Some(other) => {
                    let v = r.algorithm.as_ref().map(|a| a.span()).unwrap_or_default();
                    let line = self.line(&v);
                    self.at_line(line, format!("dkim algorithm \"{other}\" is not known; write \"rsa-sha256\" (the default) or \"ed25519-sha256\""));
                    continue;
                }
            };
            let Some(key_file) = self.path("dkim key_file", &r.key_file) else {
                continue;
            };
            // Permissions first: a key others can read is refused unread.
            if key_file.exists()
                && let Err(e) = crate::check_private_file("dkim key_file", &key_file)
            {
                self.at(&r.key_file, e);
                continue;
            }
            let key = match read_key(&key_file) {
                Ok(key) => key,
                Err(e) => {
                    self.at(&r.key_file, format!("dkim key_file \"{}\" {e}; generate one with: poolrelay dkim keygen --domain {} --selector {} --out {}", key_file.display(), r.domain.get_ref(), r.selector.get_ref(), key_file.display()));
                    continue;
                }
            };
            if let DkimKey::Rsa { bits, .. } = &key
                && *bits < MIN_RSA_BITS
            {
                self.at(&r.key_file, format!("dkim key_file \"{}\" holds an RSA key of {bits} bits, which receivers refuse; use {MIN_RSA_BITS} bits or more: openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {}", key_file.display(), key_file.display()));
                continue;
            }
            if key.algorithm() != algorithm {
                let fix = match key.algorithm() {
                    DkimAlgorithm::RsaSha256 => "algorithm = \"rsa-sha256\" (or omit it)",
                    DkimAlgorithm::Ed25519Sha256 => "algorithm = \"ed25519-sha256\"",
                };
                let at = r
                    .algorithm
                    .as_ref()
                    .map(|a| a.span())
                    .unwrap_or(r.key_file.span());
                let line = self.line(&at);
                self.at_line(line, format!("dkim algorithm \"{}\" does not match key_file \"{}\", which holds an {} key; write {fix}, or name a key of that kind", algorithm.as_str(), key_file.display(), key.kind()));
                continue;
            }
            let mut entry_pools = Vec::new();
            if let Some(list) = &r.pools {
                if list.get_ref().is_empty() {
                    self.at(list, "dkim pools = [] signs nothing; list the pools whose mail this key signs, or omit pools to sign every pool's mail".to_string());
                }
                for p in list.get_ref() {
                    if self.known_pool("dkim pools entry", p, pools)
                        && !entry_pools.contains(p.get_ref())
                    {
                        entry_pools.push(p.get_ref().clone());
                    }
                }
            }
            let headers = match &r.headers {
                None => DEFAULT_DKIM_HEADERS.iter().map(|h| h.to_string()).collect(),
                Some(list) => {
                    let names: Vec<String> = list
                        .get_ref()
                        .iter()
                        .map(|h| h.get_ref().trim().to_string())
                        .collect();
                    if !names.iter().any(|h| h.eq_ignore_ascii_case("from")) {
                        self.at(list, "dkim headers must include \"From\" (RFC 6376 requires it); add \"From\", or omit headers for the default set".to_string());
                        continue;
                    }
                    if let Some(bad) = list.get_ref().iter().find(|h| {
                        let h = h.get_ref().trim();
                        h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                    }) {
                        self.at(bad, format!("dkim headers entry \"{}\" is not a header field name; write names such as \"Subject\"", bad.get_ref()));
                        continue;
                    }
                    names
                }
            };
            if let Some(other) = out
                .iter()
                .find(|d| d.domain == domain && d.selector == selector)
            {
                let msg = format!(
                    "dkim selector \"{selector}\" of domain \"{domain}\" is already configured on line {}; one selector names one key: use another selector",
                    other.line
                );
                self.at(&r.selector, msg);
                continue;
            }
            out.push(Dkim {
                domain,
                selector,
                key_file,
                key,
                algorithm,
                pools: entry_pools,
                headers,
                envelope_fallback: r.envelope_fallback.as_ref().is_none_or(|v| *v.get_ref()),
                line,
            });
        }
        for pool in pools.values().filter(|p| p.arc_seal) {
            let has_key = out
                .iter()
                .any(|d| d.algorithm == DkimAlgorithm::RsaSha256 && d.pools.contains(&pool.name));
            if !has_key {
                self.at_line(pool.line, format!("pool {} has arc_seal = true but no RSA [[dkim]] entry names it in pools; add pools = [\"{}\"] to the [[dkim]] entry (rsa-sha256) whose key seals this pool's mail, or remove arc_seal", pool.name, pool.name));
            }
        }
        out
    }
}
