// Checks createKeelClient's session handling against a real keel whose
// access tokens live 4 s (scripts/ts-package.sh starts it so): a refresh in
// the token's last half-life, once for eight concurrent calls, and logout.
// Usage: node dist/session-check.js URL EMAIL PASSWORD; exits 1 on a mismatch.

import { Code, ConnectError, createKeelClient } from "@keel/client";
import { BadRequestSchema } from "@keel/client/gen/google/rpc/error_details_pb";

declare const process: { argv: string[]; exit(code: number): never };

function check(ok: boolean, what: string): void {
  if (!ok) {
    console.error(`session-check: FAIL: ${what}`);
    process.exit(1);
  }
}

const [url, email, password] = process.argv.slice(2);
const keel = createKeelClient({ baseUrl: url });

// Validation errors carry google.rpc.BadRequest, decoded with the package's generated schema.
try {
  await keel.identity.commands.register({ email: "not an email", password: "short", displayName: "x" });
  check(false, "an invalid registration succeeded");
} catch (e) {
  const error = ConnectError.from(e);
  check(error.code === Code.InvalidArgument, `invalid input: ${error.code}`);
  const fields = error.findDetails(BadRequestSchema).flatMap((d) => d.fieldViolations.map((v) => v.field));
  check(fields.includes("email") && fields.includes("password"), `field violations: ${fields.join(",")}`);
}

await keel.login(email, password);
const first = await keel.accessToken();
check(first !== undefined && keel.refreshes === 0, "logged in, nothing refreshed yet");

// Real time has to pass for a token to age: past half of its 4 s, short of its expiry.
await new Promise((resolve) => setTimeout(resolve, 2300));
const users = await Promise.all(Array.from({ length: 8 }, () => keel.identity.queries.getCurrentUser({})));
check(users.every((r) => r.user?.email === email), "every concurrent call answered as the user");
check(keel.refreshes === 1, `eight concurrent calls refreshed ${keel.refreshes} times, not once`);
check((await keel.accessToken()) !== first, "the refresh replaced the access token");

await keel.logout();
check((await keel.accessToken()) === undefined, "logout forgot the tokens");
try {
  await keel.identity.queries.getCurrentUser({});
  check(false, "a call after logout succeeded");
} catch (e) {
  check(ConnectError.from(e).code === Code.Unauthenticated, "after logout: unauthenticated");
}
console.log("session-check: ok (1 refresh for 8 concurrent calls, logout)");
