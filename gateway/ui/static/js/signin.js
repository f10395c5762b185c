// The sign-in form shared by the chat and admin pages. The key lives in sessionStorage only.
import { ApiError, getKey, setKey } from "./api.js";

/**
 * Wire the form; `verify(key)` must throw ApiError when the key is not good enough for this page.
 * `onReady()` runs once a key is accepted (at load too, when the tab already holds one).
 */
export function setupSignIn({ verify, onReady }) {
  const view = document.getElementById("signin");
  const app = document.getElementById("app");
  const form = document.getElementById("signin-form");
  const input = document.getElementById("api-key");
  const message = document.getElementById("signin-error");

  const show = (signedIn) => {
    view.hidden = signedIn;
    app.hidden = !signedIn;
    if (!signedIn) input.focus();
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
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
    onReady();
  });

  const signOut = (reason = "") => {
    setKey("");
    message.textContent = reason;
    show(false);
  };
  document.getElementById("signout")?.addEventListener("click", () => signOut("Signed out."));

  if (getKey()) {
    verify(getKey()).then(() => {
      show(true);
      onReady();
    }, (err) => {
      const reason = err instanceof ApiError ? err.friendly : String(err);
      if (err.status === 401) signOut(reason); // a dead key is forgotten
      else {
        message.textContent = reason; // e.g. a chat key on the admin page: keep it for the chat page
        show(false);
      }
    });
  } else {
    show(false);
  }
  return { signOut };
}
