//! `KEYGATE_*` environment variables: each names one setting (`KEYGATE_PROXY_TLS_CERT_FILE` is
//! `proxy.tls.cert_file`), read from the raw serde types themselves so a new field needs no
//! second list. Variables shaped like Kubernetes service links are skipped; any other unknown
//! `KEYGATE_*` variable is refused, so a typo cannot silently leave a default in force.

use serde::de::value::{Error as WalkError, SeqDeserializer};
use serde::de::{self, Deserialize, IntoDeserializer, MapAccess, Visitor};

use super::raw::RawConfig;
use super::ConfigError;

/// Applies `KEYGATE_<SECTION>_<SETTING>=value` variables on top of the file. Values are read as
/// TOML when they parse (`5`, `true`, `["a:read"]`) and as strings otherwise (`10s`,
/// `127.0.0.1:8080`). Returns the variables skipped as Kubernetes service links.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let settings: Vec<(String, Vec<&'static str>)> = settings()
        .into_iter()
        .map(|path| (variable(&path), path))
        .collect();
    let mut ignored = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("KEYGATE_") else {
            continue;
        };
        // KEYGATE_CONFIG names the file; KEYGATE_TEST_* belong to the test suite.
        if rest == "CONFIG" || rest.starts_with("TEST_") {
            continue;
        }
        let Some((_, path)) = settings
            .iter()
            .find(|(variable, _)| variable.eq_ignore_ascii_case(&name))
        else {
            if is_service_link(&name) {
                ignored.push(name);
                continue;
            }
            return Err(ConfigError::new(
                name,
                "does not name a setting (KEYGATE_<SECTION>_<SETTING>, e.g. KEYGATE_PROXY_LISTEN \
                 for proxy.listen; see docs/reference/configuration.md)",
            ));
        };
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let (leaf, tables) = path.split_last().expect("a setting path is never empty");
        let mut at = &mut *table;
        for (depth, key) in tables.iter().enumerate() {
            let entry = at
                .entry(*key)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::new(
                        tables[..=depth].join("."),
                        "must be a table",
                    ))
                }
            };
        }
        at.insert(leaf.to_string(), parsed);
    }
    Ok(ignored)
}

/// Every setting the environment may address, as its path (`["proxy", "tls", "cert_file"]`).
/// Top-level arrays (`[[routes]]`) come only from the file.
pub(super) fn settings() -> Vec<Vec<&'static str>> {
    let mut out = Vec::new();
    // The walk hands every field a default-shaped value, which the raw types accept.
    RawConfig::deserialize(Walk {
        path: Vec::new(),
        out: &mut out,
    })
    .expect("the raw configuration types are plain structs of scalars and lists");
    out.retain(|path| path.len() > 1);
    out
}

/// The variable naming a setting: `proxy.tls.cert_file` is `KEYGATE_PROXY_TLS_CERT_FILE`.
pub(super) fn variable(path: &[&str]) -> String {
    format!("KEYGATE_{}", path.join("_").to_ascii_uppercase())
}

/// Whether `name` has one of the shapes Kubernetes gives the variables it injects for every
/// Service in the namespace (`enableServiceLinks`, on by default): a Service named
/// `keygate-proxy` yields `KEYGATE_PROXY_SERVICE_HOST`, `KEYGATE_PROXY_SERVICE_PORT`,
/// `KEYGATE_PROXY_SERVICE_PORT_<PORT NAME>`, `KEYGATE_PROXY_PORT` and
/// `KEYGATE_PROXY_PORT_<N>_<TCP|UDP|SCTP>` with `_PROTO`, `_PORT` and `_ADDR` variants.
pub(super) fn is_service_link(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") || name.ends_with("_PORT")
    {
        return true;
    }
    if let Some((_, port_name)) = name.split_once("_SERVICE_PORT_") {
        return !port_name.is_empty()
            && port_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    }
    // <SERVICE>_PORT_<N>_<PROTOCOL>[_PROTO|_PORT|_ADDR]; the service part may itself hold
    // `_PORT_`, so try every occurrence.
    name.match_indices("_PORT_").any(|(at, _)| {
        let mut parts = name[at + "_PORT_".len()..].split('_');
        let number = parts.next().unwrap_or_default();
        let protocol = parts.next().unwrap_or_default();
        let suffix = parts.next();
        !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
            && matches!(protocol, "TCP" | "UDP" | "SCTP")
            && matches!(suffix, None | Some("PROTO" | "PORT" | "ADDR"))
            && parts.next().is_none()
    })
}

/// A deserializer that visits every field of the raw types, recording the path of each leaf.
struct Walk<'a> {
    path: Vec<&'static str>,
    out: &'a mut Vec<Vec<&'static str>>,
}

impl Walk<'_> {
    fn leaf(self) {
        self.out.push(self.path);
    }
}

impl<'de> de::Deserializer<'de> for Walk<'_> {
    type Error = WalkError;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, WalkError> {
        Err(de::Error::custom(format!(
            "{}: a type the settings walk does not know; teach config::env about it",
            self.path.join(".")
        )))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_map(Fields {
            fields,
            next: 0,
            path: self.path,
            out: self.out,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.leaf();
        visitor.visit_seq(SeqDeserializer::new(std::iter::empty::<()>()))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.leaf();
        visitor.visit_string(String::new())
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.leaf();
        visitor.visit_bool(false)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.leaf();
        visitor.visit_u32(0)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.leaf();
        visitor.visit_u64(0)
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u128 f32 f64 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A struct's fields, each once, with a `Walk` one level down for its value.
struct Fields<'a> {
    fields: &'static [&'static str],
    next: usize,
    path: Vec<&'static str>,
    out: &'a mut Vec<Vec<&'static str>>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = WalkError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, WalkError> {
        match self.fields.get(self.next) {
            Some(field) => seed.deserialize(field.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, WalkError> {
        let field = self.fields[self.next];
        self.next += 1;
        let mut path = self.path.clone();
        path.push(field);
        seed.deserialize(Walk {
            path,
            out: self.out,
        })
    }
}
