//! The OpenAPI 3.1 document of the REST routes, generated from the same
//! descriptors: paths, parameters, request and response schemas (in the
//! `{"data": ...}` envelope), the error schema and bearer auth.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use crate::routes::{BodyBinding, Route, RouteTable};

pub fn document(routes: &RouteTable, pool: &DescriptorPool) -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut schemas = Schemas::default();
    let mut tags = BTreeSet::new();
    // OpenAPI treats `/v1/users/{id}` and `/v1/users/{user.id}` as one
    // path, whose operations must all use its template's names: each
    // variable is named so that every operation can agree (see
    // `shared_names`), and a parameter that sets another field says which.
    let mut groups: BTreeMap<String, Vec<&Route>> = BTreeMap::new();
    for route in routes.routes() {
        groups
            .entry(structural_path(&route.template.openapi_path()))
            .or_default()
            .push(route);
    }
    for group in groups.values() {
        let names = shared_names(group);
        let key = group[0].template.openapi_path_named(&names);
        for route in group {
            let service = route.method.parent_service();
            tags.insert(service.name().to_owned());
            let operation = operation(route, &names, &mut schemas);
            paths
                .entry(key.clone())
                .or_default()
                .insert(route.http_method.as_str().to_ascii_lowercase(), operation);
        }
    }
    let _ = pool;
    let mut components = schemas.finish();
    components.insert(
        "Error".to_owned(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "description": "The gRPC code name, e.g. NOT_FOUND.", "examples": ["NOT_FOUND"]},
                        "message": {"type": "string"},
                        "details": {"type": "array", "items": {"type": "object", "description": "A google.rpc detail such as BadRequest or RetryInfo, with its @type."}},
                        "request_id": {"type": ["string", "null"]}
                    }
                }
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Keel API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every method is also served over gRPC and grpc-web on the same port. Successful responses are wrapped as {\"data\": ...}; failures as {\"error\": ...}. Fields at their default value are always present (0, false, \"\", []); 64-bit integers are strings."
        },
        "tags": tags.into_iter().map(|name| json!({"name": name})).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "responses": {
                "Error": {
                    "description": "An error, with the HTTP status of its code.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                }
            }
        },
        "security": [{"bearer": []}, {}]
    })
}

/// The parameter names of routes that share one OpenAPI path, position by
/// position: the field path when every route binds the same one (`id`),
/// else its last part when that agrees (`id` for `id` and `user.id`), else
/// a neutral `param<n>`; never one name twice in a path.
fn shared_names(group: &[&Route]) -> Vec<String> {
    let count = group[0].template.variables.len();
    let mut names: Vec<String> = Vec::with_capacity(count);
    for position in 0..count {
        let paths: Vec<&[String]> = group
            .iter()
            .map(|route| route.template.variables[position].field_path.as_slice())
            .collect();
        let agreed = |name: &dyn Fn(&[String]) -> String| {
            let first = name(paths[0]);
            paths.iter().all(|path| name(path) == first).then_some(first)
        };
        let name = agreed(&|path: &[String]| path.join("."))
            .or_else(|| agreed(&|path: &[String]| path.last().cloned().unwrap_or_default()))
            .filter(|name| !name.is_empty() && !names.contains(name))
            .unwrap_or_else(|| format!("param{}", position + 1));
        names.push(name);
    }
    names
}

/// `/v1/users/{user.id}` -> `/v1/users/{}`
fn structural_path(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if inside => {}
            _ => out.push(c),
        }
    }
    out
}

fn operation(route: &Route, names: &[String], schemas: &mut Schemas) -> Value {
    let method = &route.method;
    let input = method.input();
    let mut parameters = Vec::new();
    let mut path_fields = BTreeSet::new();
    for (variable, name) in route.template.variables.iter().zip(names) {
        let field = variable.field_path.join(".");
        path_fields.insert(field.clone());
        // The route table refused templates naming unknown fields, so the
        // field is always found; a plain string is the harmless fallback.
        let mut schema = resolve(&input, &variable.field_path)
            .map_or_else(|| json!({"type": "string"}), |field| leaf_schema(&field, schemas));
        if let Some(pattern) = route.template.variable_pattern(variable) {
            schema["description"] = json!(format!("matches {pattern}"));
        }
        let mut parameter = json!({"name": name, "in": "path", "required": true, "schema": schema});
        if *name != field {
            parameter["description"] = json!(format!("sets the request field {field}"));
        }
        parameters.push(parameter);
    }
    let body_field = match &route.body {
        BodyBinding::Field(field) => Some(field.name().to_owned()),
        _ => None,
    };
    if !matches!(route.body, BodyBinding::Whole) {
        for (name, field) in query_fields(&input, "", 0) {
            if path_fields.contains(&name)
                || body_field
                    .as_deref()
                    .is_some_and(|body| name.split('.').next() == Some(body))
            {
                continue;
            }
            let schema = if field.is_list() {
                json!({"type": "array", "items": leaf_schema(&field, schemas)})
            } else {
                leaf_schema(&field, schemas)
            };
            let mut parameter = json!({"name": name, "in": "query", "required": false, "schema": schema});
            if field.is_list() {
                parameter["explode"] = json!(true);
            }
            parameters.push(parameter);
        }
    }
    let mut operation = json!({
        "operationId": format!("{}_{}", method.parent_service().name(), method.name()),
        "tags": [method.parent_service().name()],
        "summary": method.name(),
        "parameters": parameters,
        "responses": {
            route.success_status.as_u16().to_string(): {
                "description": "Success",
                "content": response_content(route, schemas)
            },
            "default": {"$ref": "#/components/responses/Error"}
        }
    });
    if let Some(comment) = comments(
        method.parent_service().parent_file().file_descriptor_proto(),
        method.path(),
    ) {
        operation["description"] = json!(comment);
    }
    let request_schema = match &route.body {
        BodyBinding::None => None,
        BodyBinding::Whole if path_fields.is_empty() => Some(schemas.reference(&input)),
        // The path sets some fields: the body holds the others.
        BodyBinding::Whole => Some(schemas.without(&input, &path_fields)),
        BodyBinding::Field(field) => Some(field_schema(field, schemas)),
    };
    if let Some(schema) = request_schema {
        // A body is needed when the fields it carries include a required one.
        let carried: Vec<FieldDescriptor> = match &route.body {
            BodyBinding::Field(field) => vec![field.clone()],
            _ => input
                .fields()
                .filter(|field| !path_fields.contains(field.name()))
                .collect(),
        };
        let needed = carried.iter().any(keel_proto::validate::is_required);
        operation["requestBody"] = json!({
            "required": needed,
            "content": {"application/json": {"schema": schema}}
        });
    }
    operation
}

fn response_content(route: &Route, schemas: &mut Schemas) -> Value {
    let data = match &route.response_body {
        Some(field) => field_schema(field, schemas),
        None => schemas.reference(&route.method.output()),
    };
    let envelope = json!({"type": "object", "required": ["data"], "properties": {"data": data}});
    if route.method.is_server_streaming() {
        json!({
            "text/event-stream": {"schema": {"type": "string", "description": "Server-sent events; each `data:` is the JSON below, an `error` event ends a failed stream."}, "x-item-schema": envelope},
            "application/x-ndjson": {"schema": envelope}
        })
    } else {
        json!({"application/json": {"schema": envelope}})
    }
}

/// The field a path variable (`user.id`) sets.
fn resolve(message: &MessageDescriptor, path: &[String]) -> Option<FieldDescriptor> {
    let mut current = message.clone();
    let mut field = None;
    for part in path {
        let found = current.get_field_by_name(part)?;
        if let Kind::Message(inner) = found.kind() {
            current = inner;
        }
        field = Some(found);
    }
    field
}

/// Fields a query string can set: scalars, enums, well-known types and
/// repeated ones, nested through singular messages (depth-limited).
fn query_fields(message: &MessageDescriptor, prefix: &str, depth: usize) -> Vec<(String, FieldDescriptor)> {
    let mut out = Vec::new();
    for field in message.fields() {
        let name = format!("{prefix}{}", field.name());
        match field.kind() {
            _ if field.is_map() => {}
            Kind::Message(inner) if !is_well_known(&inner) => {
                if !field.is_list() && depth < 3 {
                    out.extend(query_fields(&inner, &format!("{name}."), depth + 1));
                }
            }
            _ => out.push((name, field)),
        }
    }
    out
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

fn field_schema(field: &FieldDescriptor, schemas: &mut Schemas) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({"type": "object"});
        };
        let value = entry.map_entry_value_field();
        return json!({"type": "object", "additionalProperties": leaf_schema(&value, schemas)});
    }
    if field.is_list() {
        return json!({"type": "array", "items": leaf_schema(field, schemas)});
    }
    leaf_schema(field, schemas)
}

/// The schema of one value of `field` with the rules its contract states
/// (`google.api.field_behavior`, `buf.validate`; see `keel_proto::validate`,
/// which the server checks): lengths, patterns, formats, ranges, enums.
fn leaf_schema(field: &FieldDescriptor, schemas: &mut Schemas) -> Value {
    let mut schema = plain_leaf_schema(field, schemas);
    let rules = keel_proto::validate::field_rules(field);
    let kind = |name: &str| {
        rules
            .as_ref()
            .and_then(|rules| keel_proto::validate::kind_rules(rules, name))
    };
    let number = |rules: &prost_reflect::DynamicMessage, name: &str| {
        rules
            .has_field_by_name(name)
            .then(|| rules.get_field_by_name(name))
            .flatten()
            .and_then(|value| value.as_u64())
    };
    let flag = |rules: &prost_reflect::DynamicMessage, name: &str| {
        rules.has_field_by_name(name)
            && rules
                .get_field_by_name(name)
                .is_some_and(|value| value.as_bool() == Some(true))
    };
    match field.kind() {
        Kind::String => {
            let mut min_length = None;
            if let Some(string) = kind("string") {
                min_length = number(&string, "min_len");
                if let Some(max) = number(&string, "max_len") {
                    schema["maxLength"] = json!(max);
                }
                if flag(&string, "email") {
                    schema["format"] = json!("email");
                }
                if flag(&string, "uuid") {
                    schema["format"] = json!("uuid");
                }
                let refused = keel_proto::validate::string_list(&string, "not_in");
                if !refused.is_empty() {
                    schema["not"] = json!({"enum": refused});
                }
                if string.has_field_by_name("pattern")
                    && let Some(pattern) = string
                        .get_field_by_name("pattern")
                        .and_then(|value| value.as_str().map(str::to_owned))
                {
                    schema["pattern"] = json!(pattern);
                }
            }
            if keel_proto::validate::is_required(field) && !field.is_list() {
                min_length = Some(min_length.unwrap_or(1).max(1));
            }
            if let Some(min) = min_length {
                schema["minLength"] = json!(min);
            }
        }
        Kind::Message(message) if message.full_name() == "google.protobuf.FieldMask" => {
            // FieldMask's JSON form: lowerCamelCase paths joined by commas.
            let allowed: Vec<String> = kind("field_mask")
                .map(|rules| keel_proto::validate::string_list(&rules, "in"))
                .unwrap_or_default()
                .iter()
                .map(|path| lower_camel(path))
                .collect();
            if !allowed.is_empty() {
                let one = format!("({})", allowed.join("|"));
                schema["pattern"] = json!(format!("^({one}(,{one})*)?$"));
            }
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            let name = if matches!(field.kind(), Kind::Uint32 | Kind::Fixed32) {
                "uint32"
            } else {
                "int32"
            };
            if let Some(rules) = kind(name) {
                for (rule, keyword) in [
                    ("gte", "minimum"),
                    ("gt", "exclusiveMinimum"),
                    ("lte", "maximum"),
                    ("lt", "exclusiveMaximum"),
                ] {
                    if let Some(bound) = number_rule(&rules, rule) {
                        schema[keyword] = json!(bound);
                    }
                }
            }
        }
        Kind::Enum(enumeration) => {
            let refused: Vec<i32> = kind("enum")
                .filter(|rules| rules.has_field_by_name("not_in"))
                .and_then(|rules| {
                    rules.get_field_by_name("not_in").and_then(|list| {
                        list.as_list()
                            .map(|values| values.iter().filter_map(|value| value.as_i32()).collect())
                    })
                })
                .unwrap_or_default();
            let refused_zero = keel_proto::validate::is_required(field) && !field.is_list();
            let names: Vec<String> = enumeration
                .values()
                .filter(|value| !(refused.contains(&value.number()) || refused_zero && value.number() == 0))
                .map(|value| value.name().to_owned())
                .collect();
            schema["enum"] = json!(names);
        }
        _ => {}
    }
    schema
}

/// `display_name` -> `displayName` (proto3 JSON's FieldMask paths).
fn lower_camel(path: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in path.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// An `int32` or `uint32` bound of `rules`, when set.
fn number_rule(rules: &prost_reflect::DynamicMessage, name: &str) -> Option<i64> {
    if !rules.has_field_by_name(name) {
        return None;
    }
    let value = rules.get_field_by_name(name)?;
    value.as_i32().map(i64::from).or_else(|| value.as_u32().map(i64::from))
}

fn plain_leaf_schema(field: &FieldDescriptor, schemas: &mut Schemas) -> Value {
    match field.kind() {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        // proto3 JSON writes 64-bit integers as decimal strings; the patterns
        // keep to values that always fit (the server also takes larger ones).
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$"})
        }
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64", "pattern": "^[0-9]{1,19}$"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(enumeration) => json!({
            "type": "string",
            "enum": enumeration.values().map(|value| value.name().to_owned()).collect::<Vec<_>>()
        }),
        Kind::Message(message) => schemas.reference(&message),
    }
}

/// Component schemas, added as they are referenced.
#[derive(Default)]
struct Schemas {
    done: BTreeMap<String, Value>,
}

impl Schemas {
    fn reference(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(schema) = well_known(message.full_name()) {
            return schema;
        }
        let name = message.full_name().to_owned();
        if !self.done.contains_key(&name) {
            self.done.insert(name.clone(), Value::Null);
            let mut properties = Map::new();
            for field in message.fields() {
                let mut schema = field_schema(&field, self);
                if let Some(comment) = comments(message.parent_file_descriptor_proto(), field.path()) {
                    schema = json!({"allOf": [schema], "description": comment});
                }
                properties.insert(field.json_name().to_owned(), schema);
            }
            let required: Vec<String> = message
                .fields()
                .filter(keel_proto::validate::is_required)
                .map(|field| field.json_name().to_owned())
                .collect();
            // The edge refuses unknown fields (`deny_unknown_fields`).
            let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
            if !required.is_empty() {
                schema["required"] = json!(required);
            }
            if let Some(comment) = comments(message.parent_file_descriptor_proto(), message.path()) {
                schema["description"] = json!(comment);
            }
            self.done.insert(name.clone(), schema);
        }
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// The schema of `message` inlined, less the fields in `omitted`.
    fn without(&mut self, message: &MessageDescriptor, omitted: &BTreeSet<String>) -> Value {
        self.reference(message);
        let mut schema = self.done.get(message.full_name()).cloned().unwrap_or(Value::Null);
        for field in message.fields().filter(|field| omitted.contains(field.name())) {
            if let Some(properties) = schema["properties"].as_object_mut() {
                properties.remove(field.json_name());
            }
            if let Some(required) = schema["required"].as_array_mut() {
                required.retain(|name| name != field.json_name());
                if required.is_empty() {
                    schema.as_object_mut().map(|object| object.remove("required"));
                }
            }
        }
        schema
    }

    fn finish(self) -> Map<String, Value> {
        self.done.into_iter().collect()
    }
}

fn well_known(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$", "examples": ["1.5s"]})
        }
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "comma-separated field paths", "examples": ["displayName,email"]})
        }
        "google.protobuf.Empty" => json!({"type": "object"}),
        "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array"}),
        "google.protobuf.Any" => {
            json!({"type": "object", "required": ["@type"], "properties": {"@type": {"type": "string"}}, "additionalProperties": true})
        }
        "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
        "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
        "google.protobuf.BytesValue" => {
            json!({"type": ["string", "null"], "contentEncoding": "base64"})
        }
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({"type": ["integer", "null"]})
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": ["string", "null"], "format": "int64"})
        }
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
            json!({"type": ["number", "null"]})
        }
        _ => return None,
    })
}

/// The leading comment of the element at `path` in its file, if any.
fn comments(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|location| location.path == path)?;
    let text = location.leading_comments.as_deref()?.trim();
    (!text.is_empty()).then(|| text.lines().map(str::trim).collect::<Vec<_>>().join("\n"))
}
