// Posts the secret of a login link (in its fragment, which the browser
// never sends by itself) for a session cookie, then opens the page. The
// fragment is cleared first, so the secret stays in no history entry.
"use strict";

(async () => {
  const message = document.getElementById("message");
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  history.replaceState(null, "", "/login");
  if (!token) {
    message.textContent = "This link has no token: open it exactly as `sdnctl topology --web` printed it.";
    return;
  }
  const r = await fetch("/login", {method: "POST", body: token, credentials: "same-origin"});
  if (r.ok) {
    location.replace("/");
  } else {
    message.textContent = "Not signed in (" + r.status + "): the link was used already, has expired, " +
      "or was made by another replica. Ask `sdnctl topology --web` for a new one.";
  }
})();
