// What the browser tests share: Debian's Chromium through playwright-core
// (no browser download: CHROMIUM names the executable), a static server for
// pages of another origin, and checks that fail loudly.

import { createServer } from "node:http";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

export const KEEL_URL = required("KEEL_URL"); // http://127.0.0.1:PORT
export const ARTIFACTS = process.env.KEEL_BROWSER_ARTIFACTS ?? "browser-artifacts";

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set (scripts/browser.sh sets it)`);
    process.exit(2);
  }
  return value;
}

export function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

export function log(test, line) {
  console.log(`${test}: ${line}`);
}

export async function launch() {
  mkdirSync(ARTIFACTS, { recursive: true });
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    // CI runs as root, where Chromium's sandbox cannot start.
    args: ["--no-sandbox"],
  });
}

// Resolves when `predicate` (run in the page) is truthy; fails after `ms`.
export async function waitInPage(page, what, predicate, arg, ms = 15000) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: ms, polling: 100 });
  } catch (error) {
    throw new Error(`${what}: not within ${ms} ms (${error.message.split("\n")[0]})`);
  }
}

// A static server on http://localhost:PORT (another origin than keel's
// http://127.0.0.1:PORT): `files` maps a path to [content type, body].
export async function staticOrigin(files) {
  const server = createServer((request, response) => {
    const path = new URL(request.url, "http://localhost").pathname;
    const file = files[path];
    if (!file) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": file[0], "cache-control": "no-store" }).end(file[1]);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const origin = `http://localhost:${server.address().port}`;
  return { origin, close: () => new Promise((resolve) => server.close(resolve)) };
}

// Runs `body`, then closes the browser; exits 1 with the error on failure.
export async function main(test, body) {
  const browser = await launch();
  try {
    await body(browser);
    log(test, "ok");
  } catch (error) {
    console.error(`${test}: FAIL: ${error.stack ?? error}`);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}
