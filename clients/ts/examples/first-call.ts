import { createKeelClient } from "@keel/client";

const keel = createKeelClient({ baseUrl: "http://127.0.0.1:8080" });
await keel.login("ada@example.com", "correct horse battery staple");
const { user } = await keel.identity.queries.getCurrentUser({});
console.log(user?.email);
