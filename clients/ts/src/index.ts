// @keel/client: the generated code of every keel module (protobuf-es
// messages and service descriptors, under "@keel/client/gen/...") and
// createKeelClient: one transport, login, the bearer token on every call,
// refresh before the access token expires.
//
//   const keel = createKeelClient({ baseUrl: "http://127.0.0.1:8080" });
//   await keel.login("ada@example.com", "correct horse battery staple");
//   const { user } = await keel.identity.queries.getCurrentUser({});

import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Client, type Interceptor, type Transport, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";

import { EventCommandService } from "./gen/keel/events/v1/commands_pb.js";
import { EventQueryService } from "./gen/keel/events/v1/queries_pb.js";
import { IdentityCommandService } from "./gen/keel/identity/v1/commands_pb.js";
import { IdentityQueryService } from "./gen/keel/identity/v1/queries_pb.js";
import type { AuthTokens, User } from "./gen/keel/identity/v1/types_pb.js";

export interface KeelClientOptions {
  /** Where keel listens, e.g. "http://127.0.0.1:8080". */
  baseUrl: string;
  /**
   * The wire protocol: "grpc-web" (binary, the default: what keel's edge
   * speaks today), "connect" (the Connect protocol, binary), or a transport
   * built by the caller (its interceptors run after the token's).
   */
  transport?: "grpc-web" | "connect" | ((interceptors: Interceptor[]) => Transport);
  /**
   * Refresh the access token when less than this much of its lifetime is
   * left (at most half of the lifetime). Default 60 s.
   */
  refreshMarginMs?: number;
  /** The fetch to use (default: the global one). */
  fetch?: typeof globalThis.fetch;
}

export interface KeelClient {
  readonly identity: {
    readonly commands: Client<typeof IdentityCommandService>;
    readonly queries: Client<typeof IdentityQueryService>;
  };
  readonly events: {
    readonly commands: Client<typeof EventCommandService>;
    readonly queries: Client<typeof EventQueryService>;
  };
  /** The transport every client above uses, for any other generated service. */
  readonly transport: Transport;
  /** Logs in and keeps the tokens; the user. */
  login(email: string, password: string): Promise<User>;
  /** Ends the session on the server, then forgets the tokens. */
  logout(): Promise<void>;
  /** The current access token (refreshed first when due), if logged in. */
  accessToken(): Promise<string | undefined>;
  /** How many times the access token was refreshed. */
  readonly refreshes: number;
}

const DEFAULT_REFRESH_MARGIN_MS = 60_000;

interface Session {
  access: string;
  refresh: string;
  refreshAt: number;
}

export function createKeelClient(options: KeelClientOptions): KeelClient {
  const margin = options.refreshMarginMs ?? DEFAULT_REFRESH_MARGIN_MS;
  let session: Session | undefined;
  // One refresh at a time: concurrent callers that find the token due wait
  // for the same one (a refresh token is single-use; reusing it revokes the
  // session).
  let refreshing: Promise<void> | undefined;
  let refreshes = 0;

  const keep = (tokens: AuthTokens | undefined): void => {
    if (!tokens) throw new Error("keel answered without tokens");
    const now = Date.now();
    const expiresAt = tokens.accessTokenExpiresAt ? timestampMs(tokens.accessTokenExpiresAt) : now;
    const lifetime = Math.max(expiresAt - now, 0);
    session = {
      access: tokens.accessToken,
      refresh: tokens.refreshToken,
      refreshAt: expiresAt - Math.min(margin, lifetime / 2),
    };
  };

  const makeTransport = (interceptors: Interceptor[]): Transport => {
    const choice = options.transport ?? "grpc-web";
    if (typeof choice === "function") return choice(interceptors);
    const common = { baseUrl: options.baseUrl, useBinaryFormat: true, interceptors, fetch: options.fetch };
    return choice === "connect" ? createConnectTransport(common) : createGrpcWebTransport(common);
  };

  // Login and refresh go without a token (and must not wait for a refresh).
  const publicCommands = createClient(IdentityCommandService, makeTransport([]));

  const accessToken = async (): Promise<string | undefined> => {
    if (session && Date.now() >= session.refreshAt) {
      if (!refreshing) {
        const current = session;
        refreshing = publicCommands
          .refreshSession({ refreshToken: current.refresh })
          .then((response) => {
            keep(response.tokens);
            refreshes += 1;
          })
          .finally(() => {
            refreshing = undefined;
          });
      }
      await refreshing;
    }
    return session?.access;
  };

  const bearer: Interceptor = (next) => async (request) => {
    const token = await accessToken();
    if (token !== undefined) request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };

  const transport = makeTransport([bearer]);
  const client: KeelClient = {
    identity: {
      commands: createClient(IdentityCommandService, transport),
      queries: createClient(IdentityQueryService, transport),
    },
    events: {
      commands: createClient(EventCommandService, transport),
      queries: createClient(EventQueryService, transport),
    },
    transport,
    async login(email, password) {
      const response = await publicCommands.login({ email, password });
      keep(response.tokens);
      if (!response.user) throw new Error("keel answered login without a user");
      return response.user;
    },
    async logout() {
      await client.identity.commands.logout({});
      session = undefined;
    },
    accessToken,
    get refreshes() {
      return refreshes;
    },
  };
  return client;
}

export { Code, ConnectError } from "@connectrpc/connect";
