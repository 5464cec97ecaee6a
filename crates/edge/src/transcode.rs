//! JSON <-> protobuf by the canonical proto3 JSON mapping (prost-reflect),
//! plus the path and query-string bindings of a route.
//!
//! The request is assembled as one JSON object (body, then query, then path
//! variables, each typed by the field it names) and parsed once, so every
//! value goes through the same mapping: 64-bit integers as strings, enums
//! by name or number, well-known types in their JSON form.

use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value};

use crate::error::EdgeError;
use crate::routes::{BodyBinding, Route};
use crate::template::Binding;

/// Protobuf bytes of the request a REST call stands for.
pub fn request_bytes(
    route: &Route,
    bindings: &[Binding],
    query: Option<&str>,
    body: &[u8],
) -> Result<Bytes, EdgeError> {
    let input = route.method.input();
    let mut json = Map::new();
    match &route.body {
        BodyBinding::None => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                return Err(EdgeError::bad_request("this method takes no request body"));
            }
        }
        BodyBinding::Whole => {
            if let Some(value) = parse_body(body)? {
                match value {
                    Value::Object(object) => json = object,
                    _ => {
                        return Err(EdgeError::bad_request("the request body must be a JSON object"));
                    }
                }
            }
        }
        BodyBinding::Field(field) => {
            if let Some(value) = parse_body(body)? {
                json.insert(field.name().to_owned(), value);
            }
        }
    }
    if let Some(query) = query {
        for (name, value) in form_urlencoded(query)? {
            if matches!(route.body, BodyBinding::Whole) {
                return Err(EdgeError::bad_request(format!(
                    "unknown query parameter {name:?}: this method reads its fields from the body"
                )));
            }
            let path: Vec<&str> = name.split('.').collect();
            if let BodyBinding::Field(field) = &route.body
                && (path[0] == field.name() || path[0] == field.json_name())
            {
                return Err(EdgeError::bad_request(format!(
                    "query parameter {name:?} sets a field that is bound to the body"
                )));
            }
            insert(&mut json, &input, &path, &value, &name, true)?;
        }
    }
    for binding in bindings {
        let path: Vec<&str> = binding.field_path.iter().map(String::as_str).collect();
        insert(
            &mut json,
            &input,
            &path,
            &binding.value,
            &binding.field_path.join("."),
            false,
        )?;
    }
    if json.is_empty() {
        // Nothing bound: the empty message, without a trip through serde.
        return Ok(Bytes::new());
    }
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    // The tracked path names the field a value was refused for.
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(Value::Object(json), &mut track);
    let message = DynamicMessage::deserialize_with_options(input, deserializer, &options).map_err(|error| {
        let path = track.path().to_string();
        if path.is_empty() || path == "." {
            EdgeError::bad_request(format!("invalid request: {error}"))
        } else {
            EdgeError::bad_request(format!("invalid request: {path}: {error}"))
        }
    })?;
    Ok(message.encode_to_vec().into())
}

fn parse_body(body: &[u8]) -> Result<Option<Value>, EdgeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|error| {
        EdgeError::bad_request(format!(
            "malformed JSON at line {}, column {}: {error}",
            error.line(),
            error.column()
        ))
    })
}

/// The name-value pairs of an `application/x-www-form-urlencoded` query
/// (`+` is a space). Stricter than `form_urlencoded::parse`, which passes a
/// malformed escape through and replaces invalid UTF-8 with U+FFFD: either
/// is a 400 here, as in grpc-gateway.
fn form_urlencoded(query: &str) -> Result<Vec<(String, String)>, EdgeError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode_component(name)?, decode_component(value)?))
        })
        .collect()
}

fn decode_component(raw: &str) -> Result<String, EdgeError> {
    if !escapes_are_well_formed(raw) {
        return Err(EdgeError::bad_request(format!(
            "bad percent-encoding in query string near {raw:?}"
        )));
    }
    percent_encoding::percent_decode_str(&raw.replace('+', " "))
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| EdgeError::bad_request("the query string is not UTF-8"))
}

/// Percent-decodes `input`; `None` when an escape is malformed (`%` not
/// followed by two hex digits) or the bytes are not UTF-8.
pub(crate) fn strict_percent_decode(input: &str) -> Option<String> {
    if !escapes_are_well_formed(input) {
        return None;
    }
    percent_encoding::percent_decode_str(input)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// Every `%` starts `%XX` with two hex digits. `percent-encoding` passes
/// any other `%` through literally; the edge refuses it instead.
fn escapes_are_well_formed(input: &str) -> bool {
    let bytes = input.as_bytes();
    bytes.iter().enumerate().all(|(index, byte)| {
        *byte != b'%'
            || (bytes.get(index + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(index + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn field_by_name(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message
        .get_field_by_name(name)
        .or_else(|| message.get_field_by_json_name(name))
}

/// Writes a string from the path or query into `json` at `path`, typed by
/// the field it names. Query values add to repeated fields; path values
/// replace whatever the body said.
fn insert(
    json: &mut Map<String, Value>,
    message: &MessageDescriptor,
    path: &[&str],
    raw: &str,
    display: &str,
    from_query: bool,
) -> Result<(), EdgeError> {
    let unknown = || {
        if from_query {
            EdgeError::bad_request(format!("unknown query parameter {display:?}"))
        } else {
            EdgeError::bad_request(format!("unknown path field {display:?}"))
        }
    };
    let field = field_by_name(message, path[0]).ok_or_else(unknown)?;
    let key = field.name().to_owned();
    if path.len() > 1 {
        let Kind::Message(inner) = field.kind() else {
            return Err(unknown());
        };
        if field.is_list() || field.is_map() || is_well_known(&inner) {
            return Err(EdgeError::bad_request(format!(
                "{display:?} cannot be set field by field"
            )));
        }
        let entry = json.entry(key).or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(object) = entry else {
            return Err(EdgeError::bad_request(format!("{display:?} conflicts with the body")));
        };
        return insert(object, &inner, &path[1..], raw, display, from_query);
    }
    if field.is_map() {
        return Err(EdgeError::bad_request(format!(
            "map field {display:?} cannot be set from the query string"
        )));
    }
    let value = scalar(&field, raw, display)?;
    if field.is_list() {
        match json.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
            Value::Array(items) if from_query => items.push(value),
            slot => *slot = Value::Array(vec![value]),
        }
    } else {
        if from_query && json.contains_key(&key) {
            return Err(EdgeError::bad_request(format!(
                "query parameter {display:?} is given twice"
            )));
        }
        json.insert(key, value);
    }
    Ok(())
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

/// The JSON value of one string for `field`: what the proto3 JSON mapping
/// would accept there.
fn scalar(field: &FieldDescriptor, raw: &str, display: &str) -> Result<Value, EdgeError> {
    let invalid = |what: &str| EdgeError::bad_request(format!("{display:?} must be {what}, got {raw:?}"));
    Ok(match field.kind() {
        Kind::Bool => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(invalid("true or false")),
        },
        Kind::Enum(_) => match raw.parse::<i64>() {
            Ok(number) => Value::from(number),
            Err(_) => Value::String(raw.to_owned()),
        },
        Kind::Message(message) if message.full_name() == "google.protobuf.BoolValue" => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(invalid("true or false")),
        },
        Kind::Message(message) if is_well_known(&message) && message.full_name() != "google.protobuf.Struct" => {
            Value::String(raw.to_owned())
        }
        Kind::Message(_) => {
            return Err(EdgeError::bad_request(format!(
                "{display:?} is a message: set its fields as {display}.<field>"
            )));
        }
        // Numbers, strings and bytes: the mapping accepts them as strings.
        _ => Value::String(raw.to_owned()),
    })
}

/// The JSON of a response: canonical mapping, lowerCamelCase, fields at their
/// default value included (so clients see `0`, `false`, `""` and `[]`).
pub fn response_json(route: &Route, bytes: &[u8]) -> Result<Value, EdgeError> {
    let message = DynamicMessage::decode(route.method.output(), bytes)
        .map_err(|error| EdgeError::internal(format!("undecodable response from {}: {error}", route.grpc_path)))?;
    message_json(&message, route.response_body.as_ref())
}

/// `{"data": <response>}` as bytes. The whole message is serialised
/// straight into the buffer, without an intermediate `Value` tree (the hot
/// path of every REST call).
pub fn response_body(route: &Route, bytes: &[u8]) -> Result<Vec<u8>, EdgeError> {
    if route.response_body.is_some() {
        let data = response_json(route, bytes)?;
        return serde_json::to_vec(&serde_json::json!({ "data": data }))
            .map_err(|error| EdgeError::internal(format!("unserializable response: {error}")));
    }
    let message = DynamicMessage::decode(route.method.output(), bytes)
        .map_err(|error| EdgeError::internal(format!("undecodable response from {}: {error}", route.grpc_path)))?;
    let mut out = Vec::with_capacity(bytes.len() * 2 + 16);
    out.extend_from_slice(b"{\"data\":");
    let mut serializer = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(&mut serializer, &SerializeOptions::new().skip_default_fields(false))
        .map_err(|error| EdgeError::internal(format!("unserializable response: {error}")))?;
    out.push(b'}');
    Ok(out)
}

pub fn message_json(message: &DynamicMessage, response_body: Option<&FieldDescriptor>) -> Result<Value, EdgeError> {
    let options = SerializeOptions::new().skip_default_fields(false);
    let serialize = |message: &DynamicMessage| {
        message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|error| EdgeError::internal(format!("unserializable response: {error}")))
    };
    match response_body {
        None => serialize(message),
        Some(field) => {
            // Wrap the one field in a message of its own kind of JSON by
            // serialising the parent and picking the field out.
            let whole = serialize(message)?;
            Ok(whole.get(field.json_name()).cloned().unwrap_or(Value::Null))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Result<Vec<(String, String)>, String> {
        form_urlencoded(query).map_err(|error| error.message)
    }

    #[test]
    fn query_strings_decode_plus_and_percent_escapes() {
        let owned = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
        };
        assert_eq!(
            pairs("a=1&b=x+y&c=%C3%A9%2B&&flag&d="),
            Ok(owned(&[("a", "1"), ("b", "x y"), ("c", "é+"), ("flag", ""), ("d", "")]))
        );
        assert_eq!(pairs("q=a%3Db%26c"), Ok(owned(&[("q", "a=b&c")])));
    }

    #[test]
    fn malformed_query_strings_are_refused() {
        assert!(pairs("a=%2").unwrap_err().contains("bad percent-encoding"));
        assert!(pairs("a=%zz").unwrap_err().contains("bad percent-encoding"));
        assert!(pairs("a=%FF").unwrap_err().contains("not UTF-8"));
    }
}
