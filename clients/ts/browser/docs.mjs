// /docs in headless Chromium with every request that does not go to keel
// blocked: Swagger UI comes from the binary, lists keel's operations, and
// the page's Content-Security-Policy refuses nothing it needs.

import { join } from "node:path";
import { ARTIFACTS, KEEL_URL, check, log, main, waitInPage } from "./lib.mjs";

const test = "docs";

await main(test, async (browser) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1600 } });
  const page = await context.newPage();
  const keel = new URL(KEEL_URL).origin;
  const blocked = [];
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith("data:") || new URL(url).origin === keel) return route.continue();
    blocked.push(url);
    return route.abort("blockedbyclient");
  });
  const problems = [];
  page.on("console", (message) => {
    const text = message.text();
    if (message.type() === "error" || /Content[- ]Security[- ]Policy/i.test(text)) problems.push(`console ${message.type()}: ${text}`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  const loaded = [];
  page.on("requestfinished", (request) => loaded.push(new URL(request.url()).pathname));

  const response = await page.goto(`${KEEL_URL}/docs`, { waitUntil: "load" });
  check(response.status() === 200, `/docs answered ${response.status()}`);
  const policy = response.headers()["content-security-policy"] ?? "";
  check(policy.includes("default-src 'none'") && policy.includes("script-src 'self'"), `policy: ${policy}`);

  // Swagger UI rendered the document: an operation block for each route.
  await waitInPage(page, "operations listed", () => document.querySelectorAll(".opblock").length > 5);
  const paths = await page.$$eval(".opblock-summary-path", (nodes) => nodes.map((node) => node.getAttribute("data-path") ?? node.textContent));
  log(test, `${paths.length} operations listed, e.g. ${paths.slice(0, 3).join(", ")}`);
  for (const path of ["/v1/auth/login", "/v1/auth/register", "/v1/users/me", "/v1/events/stream", "/v1/events/stream-tickets"]) {
    check(paths.some((shown) => shown.replace(/\u200b/g, "") === path), `${path} is listed (got ${paths.join(" ")})`);
  }
  check(loaded.includes("/openapi.json"), `the document was fetched (${loaded.join(" ")})`);

  const screenshot = join(ARTIFACTS, "docs.png");
  await page.screenshot({ path: screenshot, fullPage: false });
  log(test, `screenshot ${screenshot}`);

  check(blocked.length === 0, `requests to other origins: ${blocked.join(" ")}`);
  check(problems.length === 0, `console errors or CSP reports:\n  ${problems.join("\n  ")}`);
  log(test, `loaded from keel only: ${[...new Set(loaded)].join(" ")}`);
});
