// A real OpenID provider for the tests: the certified `oidc-provider` package (panva), installed by
// ./scripts/test into .cache/npm, with the test clients and users given in a JSON file.
//
//   node tests/support/oidc_provider.mjs CONFIG.json
//
// CONFIG: {"port": N, "issuer": "http://127.0.0.1:N", "clients": [oidc-provider client metadata...],
//          "users": [{"username", "password", "sub", "email", "name", "groups": [...]}],
//          "id_token_ttl_s": 3600}
// Users sign in on a plain form at /interaction/<uid> (username and password checked against CONFIG);
// consent is granted automatically (the appliance is a first-party client). Claims of the granted scopes
// (email, profile, groups) are put in the ID token, as Keycloak's and Entra ID's group claims are.
// Prints "oidc-provider listening on ISSUER" once it accepts connections.
import { generateKeyPairSync, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
// The package lives in the project-local npm prefix (.cache/npm), not beside this file.
const prefix = process.env.APPLIANCE_TEST_NPM_PREFIX;
const require = createRequire(pathToFileURL(`${prefix}/node_modules/`).href);
const { default: Provider } = await import(pathToFileURL(require.resolve("oidc-provider")).href);

const users = new Map(config.users.map((user) => [user.sub, user]));
const byName = new Map(config.users.map((user) => [user.username, user]));

function sameSecret(given, expected) {
  const a = Buffer.from(String(given));
  const b = Buffer.from(String(expected));
  return a.length === b.length && timingSafeEqual(a, b);
}

const signingKey = generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey.export({ format: "jwk" });

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: [{ ...signingKey, kid: `test-${randomBytes(4).toString("hex")}`, use: "sig", alg: "RS256" }] },
  cookies: { keys: [randomBytes(32).toString("hex")] },
  claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"], groups: ["groups"] },
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: { IdToken: config.id_token_ttl_s ?? 3600 },
  async findAccount(ctx, sub) {
    const user = users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, email: user.email, email_verified: true, name: user.name, groups: user.groups };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope("openid email profile groups");
    await grant.save();
    ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId, grant.jti);
    return grant;
  },
});

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, problem = "") {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Test IdP sign-in</title></head>
<body><h1>Test identity provider</h1>
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<label for="username">Username</label> <input id="username" name="username" autocomplete="off">
<label for="password">Password</label> <input id="password" name="password" type="password">
<p role="alert">${escapeHtml(problem)}</p>
<button type="submit">Continue</button></form></body></html>`;
}

async function readForm(req) {
  let body = "";
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 64 * 1024) throw new Error("form too large");
  }
  return new URLSearchParams(body);
}

function html(res, status, text) {
  res.writeHead(status, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
  res.end(text);
}

async function interaction(req, res) {
  const match = /^\/interaction\/([^/?]+)(\/login)?/.exec(req.url);
  const details = await provider.interactionDetails(req, res);
  if (details.prompt.name !== "login") {
    return provider.interactionFinished(req, res, { consent: {} }, { mergeWithLastSubmission: true });
  }
  if (req.method === "GET") return html(res, 200, loginPage(match[1]));
  const form = await readForm(req);
  const user = byName.get(form.get("username") || "");
  if (!user || !sameSecret(form.get("password") || "", user.password)) {
    return html(res, 200, loginPage(match[1], "Wrong username or password."));
  }
  return provider.interactionFinished(req, res, { login: { accountId: user.sub } }, { mergeWithLastSubmission: false });
}

const handle = provider.callback();
const server = createServer((req, res) => {
  if (req.url.startsWith("/interaction/")) {
    interaction(req, res).catch((err) => html(res, 400, `<p>${escapeHtml(err.message)}</p>`));
    return;
  }
  handle(req, res);
});
server.listen(config.port, "127.0.0.1", () => console.log(`oidc-provider listening on ${config.issuer}`));
const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
