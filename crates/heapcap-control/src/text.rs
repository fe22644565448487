//! heapcap-policy's values on the wire as the text users write and read: a quota as `"64Mi"` or
//! `"none"`, through its `Display` and `FromStr` (`#[serde(with = "text::option")]` for an
//! optional field).
//!
//! Why not serde derives on the policy types: heapcap-policy is the dependency-light bottom of
//! heapcap and has no serde, and the text of its values is already defined there once. This
//! protocol is the one place that needs them in JSON, so it adapts them here; the JSON is what
//! it was when these fields were strings.

/// An `Option` of such a value: `null` (or, with `#[serde(default)]`, no field) is `None`.
pub mod option {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

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
