// EventSource from another origin: a page on http://localhost:A (a static
// server here) follows keel's events at http://127.0.0.1:P with a stream
// ticket. P is a TCP proxy in front of keel, so the test can cut the
// connection under the browser: Chromium reconnects on its own with
// Last-Event-ID and the events continue with no gap and no repeat.

import { readFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { KEEL_URL, check, log, main, staticOrigin, waitInPage } from "./lib.mjs";

const test = "eventsource";
const keel = new URL(KEEL_URL);

// A proxy that remembers the head of every request it passes and can drop
// every connection at once.
async function proxy() {
  const sockets = new Set();
  const heads = [];
  const server = createServer((client) => {
    const upstream = createConnection({ host: keel.hostname, port: Number(keel.port) });
    sockets.add(client);
    sockets.add(upstream);
    client.on("data", (chunk) => {
      const text = chunk.toString("latin1");
      for (const head of text.split(/\r\n\r\n/)) {
        if (/^(GET|POST|OPTIONS|PATCH) /.test(head)) heads.push(head);
      }
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    heads,
    dropAll: () => {
      const count = sockets.size;
      for (const socket of sockets) socket.destroy();
      return count;
    },
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

// Makes `count` events of the user (display-name updates), straight to keel.
async function updates(userId, accessToken, from, count) {
  for (let index = from; index < from + count; index++) {
    const response = await fetch(`${KEEL_URL}/v1/users/${userId}?updateMask=displayName`, {
      method: "PATCH",
      headers: { "content-type": "application/json", authorization: `Bearer ${accessToken}` },
      body: JSON.stringify({ displayName: `EventSource ${index}` }),
    });
    check(response.ok, `update ${index}: ${response.status} ${await response.text()}`);
  }
}

// The truth to compare with: every event the user may see, read with its
// access token as NDJSON, up to sequence `through`.
async function allEvents(accessToken, through) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10000);
  const response = await fetch(`${KEEL_URL}/v1/events/stream?topics=identity.*`, {
    headers: { authorization: `Bearer ${accessToken}` },
    signal: controller.signal,
  });
  check(response.ok, `reference stream: ${response.status}`);
  const ids = [];
  let buffer = "";
  const decoder = new TextDecoder();
  try {
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        const sequence = Number(line.data?.sequence ?? 0);
        if (line.data?.event) ids.push(sequence);
        if (sequence >= through) return ids;
      }
    }
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
  throw new Error(`reference stream ended before sequence ${through}`);
}

await main(test, async (browser) => {
  const front = await proxy();
  const site = await staticOrigin({
    "/": ["text/html; charset=utf-8", '<!doctype html><title>events</title><script src="/eventsource.js"></script>'],
    "/eventsource.js": ["text/javascript", readFileSync(new URL("./pages/eventsource.js", import.meta.url))],
  });
  try {
    const page = await browser.newPage();
    page.on("pageerror", (error) => log(test, `page error: ${error.message}`));
    await page.goto(`${site.origin}/`);
    log(test, `page on ${site.origin}, keel behind ${front.url}`);
    const email = `eventsource-${Date.now()}@example.com`;
    const session = await page.evaluate(
      ([api, email]) => window.start(api, email, "correct horse battery staple"),
      [front.url, email],
    );
    // Registered and signed in: two events, then three more.
    await waitInPage(page, "the first events", () => window.received.length >= 2);
    await updates(session.userId, session.accessToken, 0, 3);
    await waitInPage(page, "five events", () => window.received.length >= 5);
    const before = await page.evaluate(() => window.received.map((event) => event.id));
    log(test, `received ${before.join(",")} over one connection`);

    // Cut it under the browser; events happen while it is away.
    const streamsBefore = front.heads.filter((head) => head.startsWith("GET /v1/events/stream")).length;
    const dropped = front.dropAll();
    log(test, `dropped ${dropped} sockets`);
    await updates(session.userId, session.accessToken, 3, 3);
    await waitInPage(page, "the reconnect", () => window.opens >= 2, undefined, 20000);
    await updates(session.userId, session.accessToken, 6, 2);
    await waitInPage(page, "the events after the reconnect", () => window.received.length >= 10, undefined, 20000);

    const state = await page.evaluate(() => ({
      received: window.received,
      opens: window.opens,
      errors: window.errors,
      gaveUp: window.gaveUp,
      readyState: window.source.readyState,
    }));
    const ids = state.received.map((event) => event.id);
    log(test, `received ${ids.join(",")}; opens ${state.opens}, errors ${state.errors}`);
    check(!state.gaveUp && state.readyState === 1, `the EventSource is open (readyState ${state.readyState})`);

    const streams = front.heads.filter((head) => head.startsWith("GET /v1/events/stream"));
    check(streams.length === streamsBefore + 1, `one reconnect request (${streams.length - streamsBefore})`);
    const reconnect = streams.at(-1);
    const lastEventId = /^last-event-id:\s*(\d+)/im.exec(reconnect)?.[1];
    check(lastEventId === String(before.at(-1)), `reconnect sent Last-Event-ID ${lastEventId}, expected ${before.at(-1)}`);
    check(/[?&]ticket=/.test(reconnect.split("\r\n")[0]), "the reconnect reused the ticket URL");
    check(/^origin: http:\/\/localhost:\d+/im.test(reconnect), "cross-origin request");

    const truth = await allEvents(session.accessToken, ids.at(-1));
    check(JSON.stringify(ids) === JSON.stringify(truth), `no gap, no repeat: got ${ids} expected ${truth}`);
    check(new Set(ids).size === ids.length, "no repeats");
    log(test, `reconnected with Last-Event-ID ${lastEventId}; ${ids.length} events, none missing or repeated`);
    await page.evaluate(() => window.source.close());
  } finally {
    await site.close();
    await front.close();
  }
});
