//! heapcap-policy's values on the wire as the text users write and read: a quota as `"64Mi"` or
//! `"none"`, a mode as `"enforce"` or `"audit"`, a scope as `"process"` or `"total"`, through
//! their `Display` and `FromStr` (`#[serde(with = "text")]`, or `text::option` for an optional
//! field).
//!
//! Why not serde derives on the policy types: heapcap-policy is the dependency-light bottom of
//! heapcap and has no serde, and the names of its values are already defined there once (the
//! annotations, `heapcap ps` and the logs use the same ones). This protocol is the one place
//! that needs them in JSON, so it adapts them here; the JSON is what it was when these fields
//! were strings.

use std::fmt::Display;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serializer};

pub fn serialize<T: Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: Display,
    D: Deserializer<'de>,
{
    String::deserialize(deserializer)?.parse().map_err(de::Error::custom)
}

/// The same for an `Option`: `null` (or, with `#[serde(default)]`, no field) is `None`.
pub mod option {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(value: &Option<T>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serializer.collect_str(v),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(deserializer)?.map(|s| s.parse().map_err(de::Error::custom)).transpose()
    }
}
