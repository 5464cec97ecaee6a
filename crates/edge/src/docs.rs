//! `/docs`: Swagger UI over `/openapi.json`, served entirely from the
//! binary. The bundle and stylesheet are swagger-ui-dist's, vendored into
//! `crates/edge/assets/swagger-ui` by `scripts/vendor-swagger-ui.sh` (its
//! license beside them); the page loads nothing from another origin, so it
//! works offline and under a policy that allows only keel's own scripts.

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{HeaderValue, header};

/// The vendored swagger-ui-dist release. Its files are served under a path
/// that names it, so they can be cached for a year: a new release is a new
/// URL.
pub const SWAGGER_UI_VERSION: &str = "5.35.0";

const BUNDLE: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js");
const STYLESHEET: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui.css");
const LICENSE: &[u8] = include_bytes!("../assets/swagger-ui/LICENSE");
const INIT: &[u8] = include_bytes!("../assets/docs/init.js");

/// What the docs page and its assets may load: scripts and styles from this
/// origin only (no inline script: the init script is its own file), the
/// document and Swagger UI's calls to this origin, images from here or
/// `data:` (Swagger UI's icons are data URIs in its stylesheet); no frames,
/// forms, plugins or framing.
pub const DOCS_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
    script-src 'self'; \
    style-src 'self'; \
    img-src 'self' data:; \
    font-src 'self'; \
    connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A year, and never revalidated: the versioned assets never change.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Where the versioned assets live.
pub fn asset_path(file: &str) -> String {
    format!("/docs/swagger-ui/{SWAGGER_UI_VERSION}/{file}")
}

/// The page: no inline script or style, every URL on this origin.
pub fn page() -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <title>Keel API</title>
    <link rel="stylesheet" href="{css}" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
    <script src="{bundle}"></script>
    <script src="/docs/init.js"></script>
  </body>
</html>
"#,
        css = asset_path("swagger-ui.css"),
        bundle = asset_path("swagger-ui-bundle.js"),
    )
}

/// `/docs` and its assets.
pub fn router() -> Router {
    let page = page();
    Router::new()
        .route(
            "/docs",
            get(move || {
                let page = page.clone();
                async move { answer("text/html; charset=utf-8", None, page.into_bytes()) }
            }),
        )
        // The init script is keel's and may change with any release: the
        // browser revalidates it.
        .route(
            "/docs/init.js",
            get(|| async { answer("text/javascript; charset=utf-8", Some("no-cache"), INIT) }),
        )
        .route(
            &asset_path("swagger-ui-bundle.js"),
            get(|| async { answer("text/javascript; charset=utf-8", Some(IMMUTABLE), BUNDLE) }),
        )
        .route(
            &asset_path("swagger-ui.css"),
            get(|| async { answer("text/css; charset=utf-8", Some(IMMUTABLE), STYLESHEET) }),
        )
        .route(
            &asset_path("LICENSE"),
            get(|| async { answer("text/plain; charset=utf-8", Some(IMMUTABLE), LICENSE) }),
        )
}

/// A docs answer with its policy; without `cache` the edge's `no-store`
/// applies.
fn answer(
    content_type: &'static str,
    cache: Option<&'static str>,
    body: impl Into<axum::body::Body>,
) -> axum::response::Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DOCS_CONTENT_SECURITY_POLICY),
            ),
        ],
        body.into(),
    )
        .into_response();
    if let Some(cache) = cache {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    }
    response
}
