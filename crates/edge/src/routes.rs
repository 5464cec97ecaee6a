//! The route table: every method's `google.api.http` rules (with their
//! additional bindings), read from descriptors alone.

use http::Method;
use keel_proto::google::api::{HttpRule, http_rule::Pattern};
use prost_reflect::{DescriptorPool, FieldDescriptor, MethodDescriptor, Value};

use crate::template::{Binding, PathTemplate};

/// Where the HTTP body goes.
#[derive(Debug, Clone)]
pub enum BodyBinding {
    /// No body: every field not in the path comes from the query string.
    None,
    /// `body: "*"`: the body is the request, less the path fields.
    Whole,
    /// `body: "field"`: the body is that field; the rest from the query.
    Field(FieldDescriptor),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub http_method: Method,
    pub template: PathTemplate,
    pub method: MethodDescriptor,
    pub body: BodyBinding,
    /// `response_body`: the response field sent instead of the whole message.
    pub response_body: Option<FieldDescriptor>,
    /// `/package.Service/Method`
    pub grpc_path: String,
    /// 200, or what `keel.api.v1.http_response` declares (201 for creation).
    pub success_status: http::StatusCode,
    /// `keel.api.v1.access` is USER or ADMIN: no `authorization`, no call.
    pub needs_caller: bool,
}

#[derive(Debug)]
pub enum RouteMatch<'a> {
    Found(&'a Route, Vec<Binding>),
    /// The path exists for other methods: 405 with `Allow`.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Every annotated method of every service in `pool`. A bad annotation is
    /// an error at start, not a surprise at request time.
    pub fn from_pool(pool: &DescriptorPool) -> Result<RouteTable, String> {
        let http = pool.get_extension_by_name("google.api.http");
        let response = pool.get_extension_by_name("keel.api.v1.http_response");
        let mut routes = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                let Some(http) = &http else { continue };
                if !options.has_extension(http) {
                    continue;
                }
                let rule: HttpRule = match options.get_extension(http).as_ref() {
                    Value::Message(message) => message
                        .transcode_to()
                        .map_err(|error| format!("{}: unreadable google.api.http: {error}", method.full_name()))?,
                    _ => continue,
                };
                let success_status = match &response {
                    Some(extension) if options.has_extension(extension) => {
                        match options.get_extension(extension).as_ref() {
                            Value::Message(message) => message
                                .get_field_by_name("success_status")
                                .and_then(|value| value.as_i32())
                                .and_then(|status| u16::try_from(status).ok())
                                .and_then(|status| http::StatusCode::from_u16(status).ok())
                                .filter(|status| status.is_success())
                                .unwrap_or(http::StatusCode::OK),
                            _ => http::StatusCode::OK,
                        }
                    }
                    _ => http::StatusCode::OK,
                };
                let mut rules = vec![rule.clone()];
                rules.extend(rule.additional_bindings.iter().cloned());
                for rule in rules {
                    routes.push(route(&method, &rule, success_status)?);
                }
            }
        }
        // Most specific first: `/v1/users/me` before `/v1/users/{id}`.
        routes.sort_by_key(|route| std::cmp::Reverse(route.template.specificity()));
        Ok(RouteTable { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut allowed = Vec::new();
        // The most specific template that matches owns the path: a literal
        // `/v1/users/me` shadows `/v1/users/{id}` for every method, so that
        // `Allow` lists what the path's own operations support (as OpenAPI
        // documents them) and no other method reaches a variable template.
        let mut owner = None;
        for route in &self.routes {
            let specificity = route.template.specificity();
            if owner.is_some_and(|owner| specificity < owner) {
                break;
            }
            if let Some(bindings) = route.template.matches(path) {
                owner = Some(specificity);
                if route.http_method == *method {
                    return RouteMatch::Found(route, bindings);
                }
                if !allowed.contains(&route.http_method) {
                    allowed.push(route.http_method.clone());
                }
            }
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(allowed)
        }
    }
}

fn route(method: &MethodDescriptor, rule: &HttpRule, success_status: http::StatusCode) -> Result<Route, String> {
    let name = method.full_name();
    let (http_method, template) = match &rule.pattern {
        Some(Pattern::Get(path)) => (Method::GET, path.as_str()),
        Some(Pattern::Put(path)) => (Method::PUT, path.as_str()),
        Some(Pattern::Post(path)) => (Method::POST, path.as_str()),
        Some(Pattern::Delete(path)) => (Method::DELETE, path.as_str()),
        Some(Pattern::Patch(path)) => (Method::PATCH, path.as_str()),
        Some(Pattern::Custom(custom)) => (
            Method::from_bytes(custom.kind.as_bytes())
                .map_err(|_| format!("{name}: bad custom method {:?}", custom.kind))?,
            custom.path.as_str(),
        ),
        None => return Err(format!("{name}: google.api.http has no pattern")),
    };
    let template = PathTemplate::parse(template).map_err(|error| format!("{name}: {error}"))?;
    let input = method.input();
    for variable in &template.variables {
        let mut message = input.clone();
        for (index, part) in variable.field_path.iter().enumerate() {
            let field = message
                .get_field_by_name(part)
                .ok_or_else(|| format!("{name}: path variable {} names no field", variable.field_path.join(".")))?;
            if index + 1 < variable.field_path.len() {
                message = match field.kind() {
                    prost_reflect::Kind::Message(inner) if !field.is_list() && !field.is_map() => inner,
                    _ => return Err(format!("{name}: {part} is not a message")),
                };
            } else if field.is_list() || field.is_map() || matches!(field.kind(), prost_reflect::Kind::Message(_)) {
                return Err(format!("{name}: path variable {part} must be a scalar field"));
            }
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyBinding::None,
        "*" => BodyBinding::Whole,
        field => BodyBinding::Field(
            input
                .get_field_by_name(field)
                .ok_or_else(|| format!("{name}: body {field:?} names no field"))?,
        ),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        field => Some(
            method
                .output()
                .get_field_by_name(field)
                .ok_or_else(|| format!("{name}: response_body {field:?} names no field"))?,
        ),
    };
    Ok(Route {
        http_method,
        template,
        method: method.clone(),
        body,
        response_body,
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        success_status,
        needs_caller: crate::access::Access::of(method).needs_caller(),
    })
}
