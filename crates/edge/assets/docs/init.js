// Starts Swagger UI on /docs with keel's own OpenAPI document. A file of its
// own, not an inline script: the page's Content-Security-Policy allows
// scripts from keel's origin only.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // The default validator is a third-party service: /docs calls none.
    validatorUrl: null,
    tryItOutEnabled: false,
  });
});
