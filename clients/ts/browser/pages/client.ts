// The page of client.mjs: keel's generated TypeScript client (clients/ts,
// protobuf-es + @connectrpc/connect-web) bundled by esbuild, run in a page
// of another origin. One flow per transport: register, login,
// getCurrentUser, over each of connect-web's transports (TRANSPORTS).

import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";

import { IdentityCommandService } from "../../src/gen/keel/identity/v1/commands_pb.js";
import { IdentityQueryService } from "../../src/gen/keel/identity/v1/queries_pb.js";

export const TRANSPORTS: Record<string, (baseUrl: string) => Transport> = {
  "Connect (JSON)": (baseUrl) => createConnectTransport({ baseUrl }),
  "Connect (binary)": (baseUrl) => createConnectTransport({ baseUrl, useBinaryFormat: true }),
  "grpc-web (binary)": (baseUrl) => createGrpcWebTransport({ baseUrl, useBinaryFormat: true }),
  "grpc-web (JSON)": (baseUrl) => createGrpcWebTransport({ baseUrl, useBinaryFormat: false }),
};

export interface Outcome {
  transport: string;
  registeredId: string;
  currentUserId: string;
  email: string;
  displayName: string;
  tokenType: string;
}

export async function run(name: string, baseUrl: string, email: string, password: string): Promise<Outcome> {
  const make = TRANSPORTS[name];
  if (!make) throw new Error(`unknown transport ${name}`);
  const transport = make(baseUrl);
  const commands = createClient(IdentityCommandService, transport);
  const queries = createClient(IdentityQueryService, transport);
  const registered = await commands.register({ email, password, displayName: `Browser ${name}` });
  const login = await commands.login({ email, password });
  const accessToken = login.tokens?.accessToken ?? "";
  const me = await queries.getCurrentUser({}, { headers: { authorization: `Bearer ${accessToken}` } });
  return {
    transport: name,
    registeredId: registered.user?.id ?? "",
    currentUserId: me.user?.id ?? "",
    email: me.user?.email ?? "",
    displayName: me.user?.displayName ?? "",
    tokenType: login.tokens?.tokenType ?? "",
  };
}

declare global {
  interface Window {
    keel: { transports: string[]; run: typeof run };
  }
}

window.keel = { transports: Object.keys(TRANSPORTS), run };
