//! The edge's JSON -> protobuf path on arbitrary input: route matching with
//! path templates, query-string binding and body transcoding must answer
//! with a result or a 400, never panic.
//!
//! Run: `cargo install cargo-fuzz` then, from the repository root,
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run json_to_protobuf -- -max_total_time=60`
//! (see docs/fuzzing.md).

#![no_main]

use std::sync::LazyLock;

use keel_edge::Edge;
use keel_edge::routes::RouteMatch;
use libfuzzer_sys::fuzz_target;

static EDGE: LazyLock<Edge> = LazyLock::new(|| {
    Edge::new(
        keel_proto::FILE_DESCRIPTOR_SET,
        keel_edge::upstream::unreachable_upstream(),
        1 << 20,
    )
    .expect("the contracts have valid routes")
});

fuzz_target!(|data: &[u8]| {
    // Layout: [method][path \n query \n body...]
    let Some((&method, rest)) = data.split_first() else { return };
    let method = [http::Method::GET, http::Method::POST, http::Method::PATCH, http::Method::DELETE][method as usize % 4].clone();
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(3, '\n');
    let path = parts.next().unwrap_or_default();
    let query = parts.next();
    let body = parts.next().unwrap_or_default();

    // A path from the input, and, so that bodies reach every message type,
    // each route's own template with the input as its body.
    if let RouteMatch::Found(route, bindings) = EDGE.routes.find(&method, &format!("/{path}")) {
        let _ = keel_edge::transcode::request_bytes(route, &bindings, query, body.as_bytes());
    }
    let routes = EDGE.routes.routes();
    if !routes.is_empty() {
        let route = &routes[data.len() % routes.len()];
        let _ = keel_edge::transcode::request_bytes(route, &[], query, body.as_bytes());
    }
});
