// The sign-in view shared by the chat and admin pages: "Sign in with <provider>" when the gateway has an
// OpenID provider (a server-side session, HttpOnly cookie), and the API key form where the admin allows it
// (the key lives in sessionStorage only). The gateway's /auth/me says which ways are open.
import { ApiError, endSession, getKey, hasSession, setKey, setSession, whoAmI } from "./api.js";

// What /auth/callback's ?signin_error=<code> means to the person who tried.
const REFUSALS = {
  group: "Your account is not in a group allowed to use this appliance.",
  email_domain: "Your account's email domain is not allowed here.",
  email_unverified: "Your email address is not verified with your identity provider.",
  user_disabled: "Your account has been disabled by an administrator.",
  subject_unsupported: "Your identity provider sent an account id this appliance cannot use.",
  expired: "The sign-in took too long or was already used. Please try again.",
  other_browser: "The sign-in was started in another browser or tab. Please try again.",
  access_denied: "Sign-in was cancelled at the identity provider.",
  token_refused: "The identity provider's answer could not be verified. Please try again.",
  provider_error: "The identity provider refused the sign-in. Please try again.",
  provider_unavailable: "The identity provider cannot be reached. Please try again later.",
};

function refusalFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const code = params.get("signin_error");
  if (!code) return "";
  params.delete("signin_error");
  const rest = params.toString();
  window.history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : "") + window.location.hash);
  return REFUSALS[code] || `Sign-in failed (${code.slice(0, 40)}).`;
}

/** Whose conversations this browser shows: the key's SHA-256 (never the key) where the page is a secure
 * context, else a 64-bit FNV-1a of it (plain-http LAN pages have no crypto.subtle); only a storage name. */
async function keyScope(key) {
  if (globalThis.crypto?.subtle) {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key)));
    return `key:${Array.from(digest.slice(0, 12), (b) => b.toString(16).padStart(2, "0")).join("")}`;
  }
  let hash = 0xcbf29ce484222325n;
  for (const byte of new TextEncoder().encode(key)) hash = ((hash ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return `key:f${hash.toString(16)}`;
}

/**
 * Wire the view; `verify(key)` must throw ApiError when the credential is not good enough for this page
 * (it is called with "" for a session). `onReady(scope)` runs once signed in (at load too, when already signed
 * in), with who it is: `user:<subject>` for a session, `key:<digest>` for a pasted key. `onSignOut()` after sign-out.
 */
export function setupSignIn({ verify, onReady, onSignOut = () => {} }) {
  const view = document.getElementById("signin");
  const app = document.getElementById("app");
  const form = document.getElementById("signin-form");
  const input = document.getElementById("api-key");
  const message = document.getElementById("signin-error");
  const provider = document.getElementById("signin-oidc");
  const keyParts = [input, form.querySelector("label[for='api-key']"), document.getElementById("signin-help"),
    form.querySelector("button[type='submit']")].filter(Boolean);
  let keyAllowed = true;

  const show = (signedIn) => {
    view.hidden = signedIn;
    app.hidden = !signedIn;
    if (!signedIn) (keyAllowed ? input : provider)?.focus();
  };

  const offer = (methods, providerName) => {
    keyAllowed = methods.includes("key");
    for (const part of keyParts) part.hidden = !keyAllowed;
    if (provider) {
      provider.hidden = !methods.includes("oidc");
      provider.textContent = `Sign in with ${providerName || "your identity provider"}`;
      provider.href = `/auth/login?return_to=${encodeURIComponent(window.location.pathname)}`;
    }
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!keyAllowed) return;
    const key = input.value.trim();
    message.textContent = "";
    if (!key) {
      message.textContent = "Enter an API key.";
      return;
    }
    try {
      await verify(key);
    } catch (err) {
      message.textContent = err instanceof ApiError ? err.friendly : String(err);
      return;
    }
    setKey(key);
    input.value = "";
    show(true);
    onReady(await keyScope(key));
  });

  const signOut = (reason = "") => {
    setKey("");
    if (hasSession()) endSession().catch(() => {}); // the server forgets the session: its cookie stops working
    setSession("");
    message.textContent = reason;
    show(false);
    onSignOut();
  };
  document.getElementById("signout")?.addEventListener("click", () => signOut("Signed out."));

  const useKey = () => {
    if (!keyAllowed || !getKey()) {
      setKey("");
      show(false);
      return;
    }
    const key = getKey();
    verify(key).then(async () => {
      show(true);
      onReady(await keyScope(key));
    }, (err) => {
      const reason = err instanceof ApiError ? err.friendly : String(err);
      if (err.status === 401) signOut(reason); // a dead key is forgotten
      else {
        message.textContent = reason; // e.g. a chat key on the admin page: keep it for the chat page
        show(false);
      }
    });
  };

  const start = async () => {
    const refusal = refusalFromUrl();
    const who = await whoAmI();
    const methods = who.body?.methods || ["key"];
    offer(methods, who.body?.provider);
    message.textContent = refusal;
    if (who.status !== 200) {
      useKey();
      return;
    }
    setKey(""); // a session is the stronger sign-in: no pasted key is kept beside it
    setSession(who.body.csrf_token);
    try {
      await verify("");
    } catch (err) {
      message.textContent = err instanceof ApiError ? err.friendly : String(err); // e.g. a user on /admin
      show(false);
      return;
    }
    show(true);
    onReady(`user:${who.body.user?.subject ?? ""}`);
  };
  start();
  return { signOut };
}
