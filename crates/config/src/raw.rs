//! The TOML document as written: serde structs with spans, before
//! validation. Field names here are the config keys.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use toml::Spanned;

/// A string value with its span.
pub(crate) type Str = Spanned<String>;
/// An integer value with its span.
pub(crate) type Int = Spanned<i64>;
/// A unit value (size, duration, bandwidth) with its span.
pub(crate) type Unit = Spanned<UnitText>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub server: Option<RawServer>,
    pub listener: Option<Vec<Spanned<RawListener>>>,
    pub admin: Option<RawAdmin>,
    pub defaults: Option<RawDefaults>,
    pub pool: Option<BTreeMap<String, Located<RawPool>>>,
    pub upstream: Option<Vec<Spanned<RawUpstream>>>,
    pub route: Option<Vec<Spanned<RawRoute>>>,
    pub user: Option<BTreeMap<String, Located<RawUser>>>,
    pub dkim: Option<Vec<Spanned<RawDkim>>>,
    pub spool: Option<Located<RawSpool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpool {
    pub backend: Option<Str>,
    pub servers: Option<Spanned<Vec<Str>>>,
    pub replicas: Option<Int>,
    pub stream_prefix: Option<Str>,
    pub ack_timeout: Option<Unit>,
    pub credentials_file: Option<Str>,
    pub tls_ca_file: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub pool: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub hostname: Option<Str>,
    pub spool_dir: Option<Str>,
    pub timezone: Option<Str>,
    pub max_sessions: Option<Int>,
    pub max_sessions_per_client: Option<Int>,
    pub command_timeout: Option<Unit>,
    pub data_timeout: Option<Unit>,
    pub max_line_length: Option<Int>,
    pub max_hops: Option<Int>,
    pub hosts: Option<BTreeMap<String, Str>>,
    pub dns_servers: Option<Vec<Str>>,
    pub spool_min_free: Option<Unit>,
    pub max_data_memory: Option<Unit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: Option<Str>,
    pub address: Str,
    pub relay_from: Option<Vec<Str>>,
    pub pool: Option<Str>,
    pub max_message_size: Option<Unit>,
    pub max_recipients: Option<Int>,
    pub tls_cert: Option<Str>,
    pub tls_key: Option<Str>,
    pub tls: Option<Str>,
    pub require_tls: Option<Spanned<bool>>,
    pub auth: Option<Str>,
    pub users_file: Option<Str>,
    pub auth_plaintext: Option<Spanned<bool>>,
    pub mt_priority: Option<Str>,
    pub mt_priority_trusted: Option<Vec<Str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub address: Option<Str>,
    pub token_file: Option<Str>,
    pub allow_unauthenticated: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub list_pool: Option<Str>,
    pub fallback: Option<Vec<Str>>,
    pub retry: Option<Spanned<Vec<Unit>>>,
    pub max_age: Option<Unit>,
    pub rate_limit: Option<Unit>,
    pub delay_warning: Option<Unit>,
    pub lower_priority_share: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub description: Option<Str>,
    pub rate_limit: Option<Unit>,
    pub retry: Option<Spanned<Vec<Unit>>>,
    pub max_age: Option<Unit>,
    pub max_messages_per_second: Option<Spanned<f64>>,
    pub max_recipients_per_hour: Option<Int>,
    pub priority: Option<Int>,
    pub lower_priority_share: Option<Str>,
    pub fallback: Option<Spanned<bool>>,
    pub arc_seal: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDkim {
    pub domain: Str,
    pub selector: Str,
    pub key_file: Str,
    pub algorithm: Option<Str>,
    pub pools: Option<Spanned<Vec<Str>>>,
    pub headers: Option<Spanned<Vec<Str>>>,
    pub envelope_fallback: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub host: Str,
    pub workers: Option<Int>,
    pub reserve_workers: Option<Int>,
    pub pools: Option<Spanned<Vec<Str>>>,
    pub failover: Option<Vec<Str>>,
    pub window: Option<Str>,
    pub tls: Option<Str>,
    pub max_messages_per_connection: Option<Int>,
    pub idle_timeout: Option<Unit>,
    pub connect_timeout: Option<Unit>,
    pub greeting_timeout: Option<Unit>,
    pub ehlo_timeout: Option<Unit>,
    pub mail_timeout: Option<Unit>,
    pub rcpt_timeout: Option<Unit>,
    pub data_init_timeout: Option<Unit>,
    pub data_block_timeout: Option<Unit>,
    pub data_end_timeout: Option<Unit>,
    pub tls_verify: Option<Spanned<bool>>,
    pub tls_ca_file: Option<Str>,
    pub auth: Option<Located<RawAuth>>,
    pub auth_plaintext: Option<Spanned<bool>>,
    pub mx: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub username: Str,
    pub password_file: Str,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub pool: Str,
    pub sender: Option<Str>,
    pub recipient: Option<Str>,
    pub header: Option<Located<RawHeader>>,
    pub listener: Option<Str>,
    pub user: Option<Str>,
    pub mt_priority: Option<Unit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeader {
    pub name: Str,
    pub value: Str,
}

/// The text of a unit value. A TOML number is accepted too (`max_age = 3600`)
/// and kept as its decimal text, so the unit parsers see a bare number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnitText(pub String);

impl<'de> Deserialize<'de> for UnitText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = UnitText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string such as \"50MB\", \"5m\" or \"1.5Mbps\", or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UnitText, E> {
                Ok(UnitText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UnitText, E> {
                Ok(UnitText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UnitText, E> {
                Ok(UnitText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<UnitText, E> {
                Ok(UnitText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Like [`toml::Spanned`], but also accepts a table that has no span of its
/// own (one made by dotted keys, `pool.A.description = "..."`), for which
/// `toml::Spanned` fails with an obscure error. Such a table gets `span: None`.
///
/// This speaks the `serde_spanned` protocol that toml 0.8 implements: the
/// deserializer recognises the struct name and field names below and then
/// hands out the start, the end and the value as three map entries.
#[derive(Debug)]
pub(crate) struct Located<T> {
    pub span: Option<Range<usize>>,
    pub value: T,
}

const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, LocatedVisitor(PhantomData))
    }
}

struct LocatedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for LocatedVisitor<T> {
    type Value = Located<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Located<T>, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            // An empty table without a span of its own.
            let value = T::deserialize(de::value::MapDeserializer::<
                std::iter::Empty<(String, String)>,
                A::Error,
            >::new(std::iter::empty()))?;
            return Ok(Located { span: None, value });
        };
        if first != SPANNED_START {
            // A plain table: give T the whole map, the key already read first.
            let value = T::deserialize(de::value::MapAccessDeserializer::new(Prepend {
                first: Some(first),
                rest: map,
            }))?;
            return Ok(Located { span: None, value });
        }
        let start: usize = map.next_value()?;
        let mut end = None;
        let mut value = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                SPANNED_END => end = Some(map.next_value::<usize>()?),
                SPANNED_VALUE => value = Some(map.next_value::<T>()?),
                other => return Err(de::Error::unknown_field(other, SPANNED_FIELDS)),
            }
        }
        match (end, value) {
            (Some(end), Some(value)) => Ok(Located {
                span: Some(start..end),
                value,
            }),
            (None, _) => Err(de::Error::missing_field(SPANNED_END)),
            (_, None) => Err(de::Error::missing_field(SPANNED_VALUE)),
        }
    }
}

/// A map access that yields one already-read key before the rest of a map.
struct Prepend<A> {
    first: Option<String>,
    rest: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Prepend<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => self.rest.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.rest.next_value_seed(seed)
    }
}
