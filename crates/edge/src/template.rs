//! `google.api.http` path templates: parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! A variable without `=` is one segment (`{id}` = `{id=*}`). A variable
//! that spans one segment is percent-decoded fully; one that spans several
//! keeps `%2F` encoded, so that a slash inside a value is not confused with
//! a separator (the rule of http.proto).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    Any,
    /// `**`: zero or more segments; only last.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `user.id` as `["user", "id"]`.
    pub field_path: Vec<String>,
    /// The segments the variable covers: `start..end` of `segments`.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub segments: Vec<Segment>,
    pub variables: Vec<Variable>,
    pub verb: Option<String>,
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid path template {:?}: {}", self.template, self.reason)
    }
}

impl std::error::Error for TemplateError {}

/// One bound variable of a matched path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub field_path: Vec<String>,
    pub value: String,
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<PathTemplate, TemplateError> {
        let error = |reason: &str| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(rest) = template.strip_prefix('/') else {
            return Err(error("must start with '/'"));
        };
        // The verb is a ':' after the last '/' and outside braces.
        let (body, verb) = split_verb(rest);
        if verb.is_some_and(str::is_empty) {
            return Err(error("empty verb"));
        }
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        loop {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| error("unclosed '{'"))?;
                let (spec, after) = (&inner[..close], &inner[close + 1..]);
                let (path, pattern) = match spec.split_once('=') {
                    Some((path, pattern)) => (path, pattern),
                    None => (spec, "*"),
                };
                let field_path: Vec<String> = path.split('.').map(str::to_owned).collect();
                if field_path.iter().any(|part| !is_ident(part)) {
                    return Err(error("variable names must be field paths like `user.id`"));
                }
                if variables
                    .iter()
                    .any(|variable: &Variable| variable.field_path == field_path)
                {
                    return Err(error("a field is bound twice"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_segment(part).ok_or_else(|| error("bad segment inside a variable"))?);
                }
                variables.push(Variable {
                    field_path,
                    start,
                    end: segments.len(),
                });
                chars = after;
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                if part.contains(['{', '}']) {
                    return Err(error("a variable must be a whole segment"));
                }
                segments.push(parse_segment(part).ok_or_else(|| error("empty or invalid segment"))?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some(next) => chars = next,
                None if chars.is_empty() => break,
                None => return Err(error("a variable must be a whole segment")),
            }
        }
        if let Some(position) = segments.iter().position(|segment| *segment == Segment::Rest)
            && position != segments.len() - 1
        {
            return Err(error("'**' must be the last segment"));
        }
        Ok(PathTemplate {
            segments,
            variables,
            verb: verb.map(str::to_owned),
            source: template.to_owned(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The bindings when `path` (no query string) matches, else `None`.
    pub fn matches(&self, path: &str) -> Option<Vec<Binding>> {
        let rest = path.strip_prefix('/')?;
        let (mut body, mut verb) = split_verb(rest);
        // A client may percent-encode the verb's colon (`%3Areplay`).
        if verb.is_none()
            && let Some(expected) = &self.verb
            && let Some(stripped) = strip_encoded_verb(body, expected)
        {
            body = stripped;
            verb = Some(expected.as_str());
        }
        if verb != self.verb.as_deref() {
            return None;
        }
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let has_rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(has_rest);
        if parts.len() < fixed || (!has_rest && parts.len() != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(&parts) {
            match segment {
                Segment::Literal(literal) if literal != part => return None,
                Segment::Any if part.is_empty() => return None,
                _ => {}
            }
        }
        let bindings = self
            .variables
            .iter()
            .map(|variable| {
                let end = if variable.end == self.segments.len() && has_rest {
                    parts.len()
                } else {
                    variable.end
                };
                let covered = &parts[variable.start..end];
                let value = if covered.len() == 1 && !(has_rest && variable.end == self.segments.len()) {
                    percent_decode(covered[0], true)
                } else {
                    covered
                        .iter()
                        .map(|part| percent_decode(part, false))
                        .collect::<Option<Vec<_>>>()
                        .map(|parts| parts.join("/"))
                };
                value.map(|value| Binding {
                    field_path: variable.field_path.clone(),
                    value,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(bindings)
    }

    /// Orders candidate templates: more literal segments first, so that
    /// `/v1/users/me` wins over `/v1/users/{id}`.
    pub fn specificity(&self) -> (usize, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|segment| matches!(segment, Segment::Literal(_)))
            .count();
        let singles = self.segments.iter().filter(|segment| **segment == Segment::Any).count();
        (literals, singles, self.verb.is_some())
    }

    /// The OpenAPI path: each variable as `{field.path}`.
    pub fn openapi_path(&self) -> String {
        let names: Vec<String> = self
            .variables
            .iter()
            .map(|variable| variable.field_path.join("."))
            .collect();
        self.openapi_path_named(&names)
    }

    /// The OpenAPI path with the variables, in order, named `names`.
    pub fn openapi_path_named(&self, names: &[String]) -> String {
        let mut out = String::new();
        let mut index = 0;
        while index < self.segments.len() {
            out.push('/');
            if let Some((position, variable)) = self
                .variables
                .iter()
                .enumerate()
                .find(|(_, variable)| variable.start == index)
            {
                out.push('{');
                match names.get(position) {
                    Some(name) => out.push_str(name),
                    None => out.push_str(&variable.field_path.join(".")),
                }
                out.push('}');
                index = variable.end.max(index + 1);
                continue;
            }
            match &self.segments[index] {
                Segment::Literal(literal) => out.push_str(literal),
                Segment::Any => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            index += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// The pattern a variable's value must follow when it is not a plain
    /// single segment (`shelves/*`), for documentation.
    pub fn variable_pattern(&self, variable: &Variable) -> Option<String> {
        let covered = &self.segments[variable.start..variable.end];
        if covered == [Segment::Any] {
            return None;
        }
        Some(
            covered
                .iter()
                .map(|segment| match segment {
                    Segment::Literal(literal) => literal.clone(),
                    Segment::Any => "*".to_owned(),
                    Segment::Rest => "**".to_owned(),
                })
                .collect::<Vec<_>>()
                .join("/"),
        )
    }
}

/// `path` less a final `%3A<verb>` (either hex case) in its last segment.
fn strip_encoded_verb<'a>(path: &'a str, verb: &str) -> Option<&'a str> {
    let rest = path.strip_suffix(verb)?;
    let colon = rest.len().checked_sub(3)?;
    let encoded = rest.get(colon..)?;
    let body = &rest[..colon];
    (encoded.eq_ignore_ascii_case("%3A") && !body.is_empty() && !body.ends_with('/')).then_some(body)
}

fn split_verb(path: &str) -> (&str, Option<&str>) {
    let last_slash = path.rfind('/').map_or(0, |index| index + 1);
    let last = &path[last_slash..];
    if last.contains('}') {
        // `{name=**}:verb` — the verb follows the closing brace.
        if let Some(close) = path.rfind('}')
            && let Some(verb) = path[close + 1..].strip_prefix(':')
        {
            return (&path[..close + 1], Some(verb));
        }
        return (path, None);
    }
    match last.find(':') {
        Some(colon) => (&path[..last_slash + colon], Some(&last[colon + 1..])),
        None => (path, None),
    }
}

fn parse_segment(part: &str) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::Any),
        "**" => Some(Segment::Rest),
        literal if literal.contains(['*', '{', '}', '=']) => None,
        literal => Some(Segment::Literal(literal.to_owned())),
    }
}

fn is_ident(part: &str) -> bool {
    let mut chars = part.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Decodes `%XX` (percent-encoding); with `all` false, `%2F` stays encoded
/// (multi-segment values). `None` for a malformed escape or non-UTF-8.
fn percent_decode(input: &str, all: bool) -> Option<String> {
    if all {
        return crate::transcode::strict_percent_decode(input);
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(slash) = find_encoded_slash(rest) {
        out.push_str(&crate::transcode::strict_percent_decode(&rest[..slash])?);
        out.push_str(&rest[slash..slash + 3]);
        rest = &rest[slash + 3..];
    }
    out.push_str(&crate::transcode::strict_percent_decode(rest)?);
    Some(out)
}

/// Where `%2F` (or `%2f`) starts in `input`.
fn find_encoded_slash(input: &str) -> Option<usize> {
    input
        .as_bytes()
        .windows(3)
        .position(|window| window[0] == b'%' && window[1] == b'2' && window[2].eq_ignore_ascii_case(&b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(template).unwrap().matches(path).map(|bindings| {
            bindings
                .into_iter()
                .map(|binding| (binding.field_path.join("."), binding.value))
                .collect()
        })
    }

    fn pairs(items: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(items.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect())
    }

    #[test]
    fn literals_and_simple_variables() {
        assert_eq!(bound("/v1/users/me", "/v1/users/me"), pairs(&[]));
        assert_eq!(bound("/v1/users/{id}", "/v1/users/42"), pairs(&[("id", "42")]));
        assert_eq!(bound("/v1/users/{id}", "/v1/users/"), None);
        assert_eq!(bound("/v1/users/{id}", "/v1/users/42/x"), None);
        assert_eq!(
            bound("/v1/users/{user.id}", "/v1/users/a%20b"),
            pairs(&[("user.id", "a b")])
        );
        assert_eq!(bound("/v1/users/{id}", "/v1/users/a%2Fb"), pairs(&[("id", "a/b")]));
        assert_eq!(bound("/v1/users/{id}", "/v1/users/%C3%A9"), pairs(&[("id", "é")]));
        // Malformed escapes and non-UTF-8 bytes match nothing.
        assert_eq!(bound("/v1/users/{id}", "/v1/users/a%2"), None);
        assert_eq!(bound("/v1/users/{id}", "/v1/users/a%zz"), None);
        assert_eq!(bound("/v1/users/{id}", "/v1/users/%FF"), None);
    }

    #[test]
    fn multi_segment_variables_and_wildcards() {
        assert_eq!(
            bound("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            pairs(&[("name", "shelves/1/books/2")])
        );
        assert_eq!(bound("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/notes/2"), None);
        assert_eq!(
            bound("/v1/files/{path=**}", "/v1/files/a/b%2Fc/d"),
            pairs(&[("path", "a/b%2Fc/d")])
        );
        assert_eq!(
            bound("/v1/files/{path=**}", "/v1/files/a%20b/c%2fd%2F%25"),
            pairs(&[("path", "a b/c%2fd%2F%")])
        );
        assert_eq!(bound("/v1/files/{path=**}", "/v1/files/a%2%2F"), None);
        assert_eq!(bound("/v1/files/{path=**}", "/v1/files"), pairs(&[("path", "")]));
        assert_eq!(bound("/v1/*/items", "/v1/x/items"), pairs(&[]));
        assert_eq!(bound("/v1/static/**", "/v1/static/a/b/c"), pairs(&[]));
    }

    #[test]
    fn a_percent_encoded_verb_colon_routes_like_a_colon() {
        let template = PathTemplate::parse("/v1/dead-letters/{id}:replay").unwrap();
        for path in [
            "/v1/dead-letters/abc:replay",
            "/v1/dead-letters/abc%3Areplay",
            "/v1/dead-letters/abc%3areplay",
        ] {
            let bindings = template.matches(path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(bindings[0].value, "abc", "{path}");
        }
        assert!(template.matches("/v1/dead-letters/abc%3Areplayx").is_none());
        assert!(template.matches("/v1/dead-letters/%3Areplay").is_none());
        // Without a verb in the template, an encoded colon is the value's.
        let plain = PathTemplate::parse("/v1/users/{id}").unwrap();
        assert_eq!(plain.matches("/v1/users/a%3Areplay").unwrap()[0].value, "a:replay");
    }

    #[test]
    fn custom_verbs() {
        assert_eq!(
            bound("/v1/orders/{id}:cancel", "/v1/orders/7:cancel"),
            pairs(&[("id", "7")])
        );
        assert_eq!(bound("/v1/orders/{id}:cancel", "/v1/orders/7"), None);
        assert_eq!(bound("/v1/orders/{id}", "/v1/orders/7:cancel"), None);
        assert_eq!(
            bound("/v1/{name=**}:undelete", "/v1/a/b:undelete"),
            pairs(&[("name", "a/b")])
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        for template in [
            "v1/users",
            "/v1/{id",
            "/v1/x{id}",
            "/v1/**/x",
            "/v1/{a}/{a}",
            "/v1/{1a}",
            "/v1//x",
            "/v1/x:",
        ] {
            assert!(PathTemplate::parse(template).is_err(), "{template}");
        }
    }

    #[test]
    fn literal_routes_are_more_specific_than_variables() {
        let me = PathTemplate::parse("/v1/users/me").unwrap();
        let id = PathTemplate::parse("/v1/users/{id}").unwrap();
        assert!(me.specificity() > id.specificity());
    }

    #[test]
    fn openapi_paths() {
        assert_eq!(
            PathTemplate::parse("/v1/users/{user.id}").unwrap().openapi_path(),
            "/v1/users/{user.id}"
        );
        let template = PathTemplate::parse("/v1/{name=shelves/*}:archive").unwrap();
        assert_eq!(template.openapi_path(), "/v1/{name}:archive");
        assert_eq!(
            template.variable_pattern(&template.variables[0]).as_deref(),
            Some("shelves/*")
        );
    }
}
