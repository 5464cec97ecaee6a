//! The field rules written in the contracts, evaluated on a request.
//!
//! Two annotations state a field's rules, and both feed the OpenAPI document
//! (crates/edge/src/openapi.rs) as well as this check:
//! - `google.api.field_behavior = REQUIRED` (AIP-203): the field is set (a
//!   string or list not empty, an enum not 0, a message present);
//! - protovalidate's `buf.validate.field` rules, of the kinds keel uses:
//!   `string` `min_len`, `max_len`, `pattern`, `uuid`, `email`, `not_in`; `int32`
//!   and `uint32` `gte`, `gt`, `lte`, `lt`; `enum` `defined_only`, `not_in`; `repeated`
//!   `min_items`, `max_items`; `field_mask` `in`; `required`; `ignore = IGNORE_IF_ZERO_VALUE`.
//!   A rule of another kind in a contract fails the `every_rule_in_the_contracts_is_known`
//!   test rather than being skipped silently.
//!
//! Why not the `prost-protovalidate` crate: its types crate runs `protoc` in
//! its build script, and keel builds without a system protoc (protox).
//!
//! One rule is stated for clients and enforced by the domain instead:
//! `string.email` (OpenAPI `format: email`, ASCII addresses). keel's email
//! type accepts internationalised domains (UTS-46), which the ASCII rule
//! would refuse; the server may accept more than the contract promises,
//! never less.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, ReflectMessage, Value,
};
use regex::Regex;

/// One broken rule: the field's path (`user.email`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// `google.api.FieldBehavior.REQUIRED`.
const REQUIRED: i32 = 2;
/// `buf.validate.Ignore.IGNORE_IF_ZERO_VALUE`.
const IGNORE_IF_ZERO_VALUE: i32 = 1;

/// The rule fields this evaluator knows, per kind of `buf.validate.FieldRules`.
#[cfg(test)]
const KNOWN_RULES: &[(&str, &[&str])] = &[
    ("string", &["min_len", "max_len", "pattern", "uuid", "email", "not_in"]),
    ("int32", &["gte", "gt", "lte", "lt"]),
    ("uint32", &["gte", "gt", "lte", "lt"]),
    ("enum", &["defined_only", "not_in"]),
    ("repeated", &["min_items", "max_items"]),
    ("field_mask", &["in"]),
];

struct Rules {
    pool: DescriptorPool,
    field_behavior: ExtensionDescriptor,
    field_rules: ExtensionDescriptor,
    /// Every `string.pattern` of the contracts, compiled once.
    patterns: HashMap<String, Regex>,
}

static RULES: LazyLock<Result<Rules, String>> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).map_err(|error| error.to_string())?;
    let field_behavior = pool
        .get_extension_by_name("google.api.field_behavior")
        .ok_or("google.api.field_behavior is not in the descriptor set")?;
    let field_rules = pool
        .get_extension_by_name("buf.validate.field")
        .ok_or("buf.validate.field is not in the descriptor set")?;
    let mut patterns = HashMap::new();
    for message in pool.all_messages() {
        for field in message.fields() {
            if let Some(pattern) = field_rules_of(&field, &field_rules)
                .and_then(|rules| kind_rules(&rules, "string"))
                .and_then(|string| string_rule(&string, "pattern"))
            {
                let compiled = Regex::new(&pattern).map_err(|error| format!("{}: {error}", field.full_name()))?;
                patterns.insert(pattern, compiled);
            }
        }
    }
    Ok(Rules {
        pool,
        field_behavior,
        field_rules,
        patterns,
    })
});

/// Every rule `message` breaks, in field order, at most one per field.
///
/// # Errors
/// When the rules of the contracts cannot be read (a broken build, not a
/// bad request): the cause, for the log.
pub fn violations<M: Message + Name>(message: &M) -> Result<Vec<FieldViolation>, String> {
    let rules = RULES.as_ref().map_err(Clone::clone)?;
    let name = M::full_name();
    let Some(descriptor) = rules.pool.get_message_by_name(&name) else {
        return Err(format!("{name} is not in the embedded descriptor set"));
    };
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|error| format!("{name} does not decode as itself: {error}"))?;
    let mut found = Vec::new();
    check_message(rules, &dynamic, "", &mut found);
    let mut named = HashSet::new();
    found.retain(|violation| named.insert(violation.field.clone()));
    Ok(found)
}

/// Whether `field` is marked `google.api.field_behavior = REQUIRED`.
pub fn is_required(field: &FieldDescriptor) -> bool {
    let Some(field_behavior) = field.parent_pool().get_extension_by_name("google.api.field_behavior") else {
        return false;
    };
    marked_required(field, &field_behavior)
}

/// The `buf.validate.field` rules of `field` (a `buf.validate.FieldRules`),
/// when it has any.
pub fn field_rules(field: &FieldDescriptor) -> Option<DynamicMessage> {
    let extension = field.parent_pool().get_extension_by_name("buf.validate.field")?;
    field_rules_of(field, &extension)
}

/// The rules of one kind (`"string"`, `"int32"`, `"enum"`, `"repeated"`)
/// within a field's rules.
pub fn kind_rules(rules: &DynamicMessage, kind: &str) -> Option<DynamicMessage> {
    if !rules.has_field_by_name(kind) {
        return None;
    }
    rules.get_field_by_name(kind)?.as_message().cloned()
}

fn marked_required(field: &FieldDescriptor, field_behavior: &ExtensionDescriptor) -> bool {
    let options = field.options();
    options.has_extension(field_behavior)
        && options
            .get_extension(field_behavior)
            .as_list()
            .is_some_and(|list| list.iter().any(|value| value.as_enum_number() == Some(REQUIRED)))
}

fn field_rules_of(field: &FieldDescriptor, extension: &ExtensionDescriptor) -> Option<DynamicMessage> {
    let options = field.options();
    if !options.has_extension(extension) {
        return None;
    }
    options.get_extension(extension).as_message().cloned()
}

fn set<'a>(rules: &'a DynamicMessage, name: &str) -> Option<std::borrow::Cow<'a, Value>> {
    if rules.has_field_by_name(name) {
        rules.get_field_by_name(name)
    } else {
        None
    }
}

fn string_rule(rules: &DynamicMessage, name: &str) -> Option<String> {
    set(rules, name).and_then(|value| value.as_str().map(str::to_owned))
}

/// A repeated string rule (`not_in`), empty when unset.
pub fn string_list(rules: &DynamicMessage, name: &str) -> Vec<String> {
    set(rules, name)
        .and_then(|value| {
            value.as_list().map(|values| {
                values
                    .iter()
                    .filter_map(|value| value.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn number_rule(rules: &DynamicMessage, name: &str) -> Option<i64> {
    set(rules, name).and_then(|value| match value.as_ref() {
        Value::I32(number) => Some(i64::from(*number)),
        Value::U64(number) => i64::try_from(*number).ok(),
        Value::U32(number) => Some(i64::from(*number)),
        Value::I64(number) => Some(*number),
        _ => None,
    })
}

fn flag(rules: &DynamicMessage, name: &str) -> bool {
    set(rules, name).is_some_and(|value| value.as_bool() == Some(true))
}

fn check_message(rules: &Rules, message: &DynamicMessage, prefix: &str, found: &mut Vec<FieldViolation>) {
    for field in message.descriptor().fields() {
        let path = format!("{prefix}{}", field.name());
        let present = message.has_field(&field);
        let mut violate = |description: String| {
            found.push(FieldViolation {
                field: path.clone(),
                description,
            })
        };
        let field_rules = field_rules_of(&field, &rules.field_rules);
        let required = marked_required(&field, &rules.field_behavior)
            || field_rules.as_ref().is_some_and(|rules| flag(rules, "required"));
        if !present && required {
            violate("is required".to_owned());
            continue;
        }
        if let Some(field_rules) = &field_rules {
            let ignored =
                set(field_rules, "ignore").and_then(|value| value.as_enum_number()) == Some(IGNORE_IF_ZERO_VALUE);
            if present || !ignored {
                check_field(rules, &field, field_rules, &message.get_field(&field), &mut violate);
            }
        }
        if !field.is_list()
            && !field.is_map()
            && let Value::Message(inner) = message.get_field(&field).as_ref()
        {
            check_message(rules, inner, &format!("{path}."), found);
        }
    }
}

fn check_field(
    rules: &Rules,
    field: &FieldDescriptor,
    field_rules: &DynamicMessage,
    value: &Value,
    violate: &mut impl FnMut(String),
) {
    if let (Some(repeated), Value::List(items)) = (kind_rules(field_rules, "repeated"), value) {
        let count = items.len() as i64;
        if let Some(min) = number_rule(&repeated, "min_items").filter(|min| count < *min) {
            violate(format!("must have at least {min} items"));
        }
        if let Some(max) = number_rule(&repeated, "max_items").filter(|max| count > *max) {
            violate(format!("must have at most {max} items"));
        }
        return;
    }
    match value {
        Value::String(text) => {
            let Some(string) = kind_rules(field_rules, "string") else {
                return;
            };
            let length = text.chars().count() as i64;
            if let Some(min) = number_rule(&string, "min_len").filter(|min| length < *min) {
                violate(format!("must be at least {min} characters"));
            } else if let Some(max) = number_rule(&string, "max_len").filter(|max| length > *max) {
                violate(format!("must be at most {max} characters"));
            } else if flag(&string, "uuid") && !is_uuid(text) {
                violate("must be a UUID (8-4-4-4-12 hexadecimal digits)".to_owned());
            } else if let Some(pattern) = string_rule(&string, "pattern")
                .filter(|pattern| rules.patterns.get(pattern).is_some_and(|regex| !regex.is_match(text)))
            {
                violate(format!("must match the pattern {pattern}"));
            } else if string_list(&string, "not_in").iter().any(|refused| refused == text) {
                violate("is one of the values the contract refuses".to_owned());
            }
            // `email`: see the module's documentation.
        }
        Value::Message(mask) if mask.descriptor().full_name() == "google.protobuf.FieldMask" => {
            let Some(field_mask) = kind_rules(field_rules, "field_mask") else {
                return;
            };
            let allowed = string_list(&field_mask, "in");
            if allowed.is_empty() {
                return;
            }
            let paths = mask.get_field_by_name("paths");
            let unknown: Vec<String> = paths
                .as_deref()
                .and_then(Value::as_list)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter(|path| !allowed.iter().any(|allowed| allowed == path))
                .map(str::to_owned)
                .collect();
            if !unknown.is_empty() {
                violate(format!(
                    "names {}; only {} can be named",
                    unknown.join(", "),
                    allowed.join(", ")
                ));
            }
        }
        Value::I32(_) | Value::U32(_) => {
            let (name, number) = match value {
                Value::U32(number) => ("uint32", i64::from(*number)),
                Value::I32(number) => ("int32", i64::from(*number)),
                _ => return,
            };
            let Some(int32) = kind_rules(field_rules, name) else {
                return;
            };
            let bounds = [
                (
                    "gte",
                    number_rule(&int32, "gte").filter(|bound| number < *bound),
                    "at least",
                ),
                (
                    "gt",
                    number_rule(&int32, "gt").filter(|bound| number <= *bound),
                    "greater than",
                ),
                (
                    "lte",
                    number_rule(&int32, "lte").filter(|bound| number > *bound),
                    "at most",
                ),
                (
                    "lt",
                    number_rule(&int32, "lt").filter(|bound| number >= *bound),
                    "less than",
                ),
            ];
            if let Some((_, Some(bound), words)) = bounds.iter().find(|(_, broken, _)| broken.is_some()) {
                violate(format!("must be {words} {bound}"));
            }
        }
        Value::EnumNumber(number) => {
            let Some(rules) = kind_rules(field_rules, "enum") else {
                return;
            };
            let Kind::Enum(descriptor) = field.kind() else { return };
            if flag(&rules, "defined_only") && descriptor.get_value(*number).is_none() {
                violate(format!("must be a value of {}", descriptor.name()));
            } else if set(&rules, "not_in").and_then(|list| {
                list.as_list()
                    .map(|values| values.iter().any(|value| value.as_i32() == Some(*number)))
            }) == Some(true)
            {
                let name = descriptor.get_value(*number).map(|value| value.name().to_owned());
                violate(format!("must not be {}", name.unwrap_or_else(|| number.to_string())));
            }
        }
        _ => {}
    }
}

/// The hyphenated form protovalidate's `string.uuid` names (RFC 4122).
fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(index, c)| match index {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
/// The messages of the descriptor set with a rule kind this evaluator does
/// not know (for the test that keeps the contracts within it).
fn unknown_rules(pool: &DescriptorPool, extension: &ExtensionDescriptor) -> Vec<String> {
    let mut unknown = Vec::new();
    for message in pool
        .all_messages()
        .filter(|message| !message.package_name().starts_with("buf."))
    {
        for field in message.fields() {
            let Some(rules) = field_rules_of(&field, extension) else {
                continue;
            };
            for (rule, value) in rules.fields() {
                let name = rule.name();
                let Some((_, known)) = KNOWN_RULES.iter().find(|(kind, _)| *kind == name) else {
                    if !matches!(name, "required" | "ignore") {
                        unknown.push(format!("{}: {name}", field.full_name()));
                    }
                    continue;
                };
                if let Value::Message(kind) = value {
                    for (inner, _) in kind.fields() {
                        if !known.contains(&inner.name()) {
                            unknown.push(format!("{}: {name}.{}", field.full_name(), inner.name()));
                        }
                    }
                }
            }
        }
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity as pb;

    fn fields(violations: Vec<FieldViolation>) -> Vec<String> {
        violations.into_iter().map(|violation| violation.field).collect()
    }

    #[test]
    fn a_valid_request_breaks_no_rule() {
        let request = pb::RegisterRequest {
            email: "ada@example.com".into(),
            password: "correct horse".into(),
            display_name: "Ada".into(),
        };
        assert_eq!(violations(&request).unwrap(), []);
    }

    #[test]
    fn required_lengths_and_patterns_are_enforced() {
        let request = pb::RegisterRequest {
            email: String::new(),
            password: "short".into(),
            display_name: "  ".into(),
        };
        assert_eq!(
            fields(violations(&request).unwrap()),
            ["email", "password", "display_name"]
        );
    }

    #[test]
    fn internationalised_email_domains_are_left_to_the_domain_type() {
        let request = pb::LoginRequest {
            email: "ada@b\u{fc}cher.example".into(),
            password: "x".into(),
        };
        assert_eq!(violations(&request).unwrap(), []);
    }

    #[test]
    fn uuids_enums_ranges_and_nested_requirements() {
        let bad_id = pb::DeleteUserRequest { id: "42".into() };
        assert_eq!(fields(violations(&bad_id).unwrap()), ["id"]);
        let bad_role = pb::CreateUserRequest {
            email: "ada@example.com".into(),
            password: "correct horse".into(),
            display_name: "Ada".into(),
            role: 42,
        };
        assert_eq!(fields(violations(&bad_role).unwrap()), ["role"]);
        let negative = pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        };
        assert_eq!(fields(violations(&negative).unwrap()), ["page_size"]);
        let no_user = pb::UpdateUserRequest::default();
        assert_eq!(fields(violations(&no_user).unwrap()), ["user"]);
    }

    #[test]
    fn uint32_bounds_hold() {
        let request = |max_attempts| crate::jobs::EnqueueJobRequest {
            kind: "jobs.noop".into(),
            max_attempts,
            ..Default::default()
        };
        assert_eq!(violations(&request(100)).unwrap(), []);
        assert_eq!(fields(violations(&request(101)).unwrap()), ["max_attempts"]);
    }

    #[test]
    fn every_rule_in_the_contracts_is_known() {
        let rules = RULES.as_ref().unwrap();
        assert_eq!(unknown_rules(&rules.pool, &rules.field_rules), Vec::<String>::new());
    }

    #[test]
    fn required_fields_are_marked() {
        let rules = RULES.as_ref().unwrap();
        let register = rules
            .pool
            .get_message_by_name("keel.identity.v1.RegisterRequest")
            .unwrap();
        let required: Vec<_> = register
            .fields()
            .filter(is_required)
            .map(|field| field.name().to_owned())
            .collect();
        assert_eq!(required, ["email", "password", "display_name"]);
    }
}
