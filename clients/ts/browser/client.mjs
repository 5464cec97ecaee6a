// The generated TypeScript client in headless Chromium: pages/client.ts
// (clients/ts's generated code and @connectrpc/connect-web) bundled with
// esbuild, served from another origin (http://localhost:A) and calling keel
// at http://127.0.0.1:P. For every transport in the page's list: register,
// login, getCurrentUser, each answered by keel.

import { build } from "esbuild";
import { KEEL_URL, check, log, main, staticOrigin } from "./lib.mjs";

const test = "client";

const bundle = await build({
  entryPoints: [new URL("./pages/client.ts", import.meta.url).pathname],
  bundle: true,
  format: "iife",
  platform: "browser",
  target: "chrome120",
  write: false,
  logLevel: "warning",
});
const script = bundle.outputFiles[0].text;
log(test, `bundled pages/client.ts: ${(script.length / 1024).toFixed(0)} KiB`);

await main(test, async (browser) => {
  const site = await staticOrigin({
    "/": ["text/html; charset=utf-8", '<!doctype html><title>client</title><script src="/client.js"></script>'],
    "/client.js": ["text/javascript", script],
  });
  try {
    const page = await browser.newPage();
    const failures = [];
    page.on("pageerror", (error) => failures.push(error.message));
    const calls = [];
    page.on("response", (response) => {
      const request = response.request();
      calls.push(`${request.method()} ${new URL(request.url()).pathname} ${response.status()} ${response.headers()["content-type"] ?? ""}`);
    });
    await page.goto(`${site.origin}/`);
    const transports = await page.evaluate(() => window.keel.transports);
    check(transports.length > 0, "the page lists its transports");
    for (const transport of transports) {
      const email = `browser-${transport.replace(/\W+/g, "-")}-${Date.now()}@example.com`;
      const outcome = await page.evaluate(
        ([name, api, email]) => window.keel.run(name, api, email, "correct horse battery staple"),
        [transport, KEEL_URL, email],
      );
      check(outcome.registeredId.length > 0, `${transport}: register returned a user`);
      check(outcome.currentUserId === outcome.registeredId, `${transport}: getCurrentUser is the registered user`);
      check(outcome.email === email, `${transport}: email ${outcome.email}`);
      check(outcome.tokenType === "Bearer", `${transport}: token type ${outcome.tokenType}`);
      log(test, `${transport}: register, login, getCurrentUser -> ${outcome.currentUserId} (${outcome.displayName})`);
    }
    check(failures.length === 0, `page errors: ${failures.join("; ")}`);
    log(test, `calls from ${site.origin}: ${calls.join(" | ")}`);
  } finally {
    await site.close();
  }
});
