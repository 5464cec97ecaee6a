// The page of eventsource.mjs, served from another origin than keel's: what
// a browser app does to follow its events. It registers and signs in over
// REST (CORS), asks for a stream ticket and opens `new EventSource(url)`,
// which cannot send an Authorization header; the browser reconnects on its
// own (same URL, `Last-Event-ID`) when the connection drops.
"use strict";

window.received = []; // [{ id, name }] in arrival order
window.opens = 0;
window.errors = 0;
window.gaveUp = false;

async function call(api, path, body, token) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(`${api}${path}`, { method: "POST", headers, body: JSON.stringify(body) });
  const json = await response.json();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${JSON.stringify(json)}`);
  return json.data;
}

window.start = async (api, email, password) => {
  const registered = await call(api, "/v1/auth/register", { email, password, displayName: "EventSource" });
  const login = await call(api, "/v1/auth/login", { email, password });
  const accessToken = login.tokens.accessToken;
  const ticket = await call(api, "/v1/events/stream-tickets", {}, accessToken);
  const source = new EventSource(
    `${api}/v1/events/stream?topics=identity.*&ticket=${encodeURIComponent(ticket.ticket)}`,
  );
  source.onopen = () => {
    window.opens += 1;
  };
  source.onmessage = (message) => {
    const data = JSON.parse(message.data).data;
    if (data.event) window.received.push({ id: Number(message.lastEventId), name: data.event.eventName });
  };
  source.onerror = () => {
    window.errors += 1;
    // CLOSED: the browser gave up (a refused reconnect); CONNECTING: it retries.
    if (source.readyState === EventSource.CLOSED) window.gaveUp = true;
  };
  // A server-side error event (the stream's last word before it ends).
  source.addEventListener("error", (event) => {
    if (event.data) window.streamError = event.data;
  });
  window.source = source;
  return { userId: registered.user.id, accessToken, validUntil: ticket.validUntil };
};
