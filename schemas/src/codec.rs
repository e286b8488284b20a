//! The two body encodings. JSON is the default; a message whose `Content-Type`
//! header is `application/msgpack` (also `application/x-msgpack`,
//! `application/vnd.msgpack`) is MessagePack with named fields. Events are
//! written in the encoding their job used.

use serde::{de::DeserializeOwned, Serialize};

/// The `Content-Type` value for MessagePack bodies.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";
/// The `Content-Type` value for JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
    Msgpack,
}

impl Encoding {
    /// The encoding a `Content-Type` header selects. `None` (no header) is JSON;
    /// an unsupported type is an error naming it.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, String> {
        let Some(ct) = content_type else { return Ok(Encoding::Json) };
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "" | "application/json" | "text/json" | "text/plain" => Ok(Encoding::Json),
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => Ok(Encoding::Msgpack),
            _ => Err(format!(
                "unsupported Content-Type {ct:?}: send JSON (no header, or application/json) or MessagePack (application/msgpack)"
            )),
        }
    }

    /// The `Content-Type` header value for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON_CONTENT_TYPE,
            Encoding::Msgpack => MSGPACK_CONTENT_TYPE,
        }
    }

    /// Encodes a value. MessagePack uses named fields (maps), never positional arrays.
    pub fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            // Serializing our own plain data types cannot fail: no maps with
            // non-string keys, no failing Serialize impls.
            Encoding::Json => serde_json::to_vec(value).unwrap_or_default(),
            Encoding::Msgpack => rmp_serde::to_vec_named(value).unwrap_or_default(),
        }
    }

    /// Decodes a value; the error names the path of the offending field
    /// (`max_tokens: invalid type: string "16", expected i64`).
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let value = serde_path_to_error::deserialize(&mut de).map_err(path_message)?;
                de.end().map_err(|e| e.to_string())?;
                Ok(value)
            }
            Encoding::Msgpack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                serde_path_to_error::deserialize(&mut de).map_err(path_message)
            }
        }
    }
}

fn path_message<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." || path.is_empty() {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_select_encodings() {
        assert_eq!(Encoding::from_content_type(None).unwrap(), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("application/json")).unwrap(), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("application/msgpack")).unwrap(), Encoding::Msgpack);
        assert_eq!(Encoding::from_content_type(Some("Application/X-MsgPack; v=1")).unwrap(), Encoding::Msgpack);
        let e = Encoding::from_content_type(Some("text/xml")).unwrap_err();
        assert!(e.contains("text/xml"), "{e}");
    }

    #[test]
    fn decode_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            max_tokens: i64,
        }
        let e = Encoding::Json.decode::<T>(br#"{"max_tokens":"16"}"#).unwrap_err();
        assert!(e.starts_with("max_tokens: "), "{e}");
        let e = Encoding::Json.decode::<T>(br#"{"max_tokens":1} x"#).unwrap_err();
        assert!(e.contains("trailing"), "{e}");
    }
}
