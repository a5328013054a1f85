// The gatehouse console: plain JavaScript over the API, no framework. The token lives in this
// tab's sessionStorage (never in local storage), so it is gone when the tab closes, and is revoked
// on the server when the user signs out. Everything the API returns is written with
// textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "gatehouse.console.token";
  // How often the dashboard asks for the group's health, and how soon after the first answer
  // it asks again, so that requests per second show without a long wait.
  const HEALTH_EVERY_MS = 5000;
  const HEALTH_FIRST_MS = 1000;
  const AUDIT_PAGE = 50;
  const VIEWS = ["dashboard", "users", "keys", "audit"];
  const ADMIN_VIEWS = ["users", "keys", "audit"];

  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let me = null;
  let healthTimer = null;
  let lastHealth = null;
  let users = [];
  let editing = null;
  let auditEvents = [];
  let auditNext = null;
  // The view on show, kept while the address names no view (after "Skip to content").
  let shownView = null;
  // Each sign-in and sign-out starts a new session: an answer to a request of an older one
  // is dropped, so that nothing of a session that ended comes back into the page.
  let session = 0;

  // ---- The API ---------------------------------------------------------------------------

  /** An error answer of the API (or no answer), with what a person needs to report it. */
  class ApiError extends Error {
    constructor(status, body, requestId) {
      const message = (body && body.message) || (status ? `HTTP ${status}` : "no answer");
      super(message);
      this.status = status;
      this.code = body && body.error;
      this.requestId = (body && body.request_id) || requestId || null;
      this.correlationId = (body && body.correlation_id) || null;
      this.handled = false;
    }

    describe() {
      const parts = [];
      if (this.status) parts.push(`HTTP ${this.status}${this.code ? " " + this.code : ""}`);
      if (this.requestId) parts.push(`request id ${this.requestId}`);
      if (this.correlationId && this.correlationId !== this.requestId) {
        parts.push(`correlation id ${this.correlationId}`);
      }
      return parts.length ? `${this.message} (${parts.join("; ")})` : this.message;
    }
  }

  // Relative to the page, so the console also works where a route serves the site and the
  // API under a prefix of their own.
  const apiUrl = (path) => new URL(`../${path}`, document.baseURI);

  // The error thrown for an answer that came after its session ended: nothing to show.
  function dropped() {
    const error = new ApiError(0, { message: "the session ended" }, null);
    error.handled = true;
    return error;
  }

  async function call(method, path, body) {
    const epoch = session;
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(apiUrl(path), init);
    } catch (e) {
      if (epoch !== session) throw dropped();
      throw new ApiError(0, { message: `the server could not be reached (${e.message})` }, null);
    }
    let text;
    try {
      text = await response.text();
    } catch {
      text = "";
    }
    if (epoch !== session) throw dropped();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = new ApiError(response.status, data, response.headers.get("X-Request-ID"));
      // A token that stopped working (signed out elsewhere, expired, its user changed):
      // back to the sign-in form, saying why.
      if (response.status === 401 && path !== "auth/login") {
        endSession(`You were signed out: ${error.describe()}. Sign in again.`);
        error.handled = true;
      }
      throw error;
    }
    return data;
  }

  // ---- Saying what happened --------------------------------------------------------------

  // Each notice is written a moment after its box is emptied, so that the same words twice
  // are read out twice; a later notice or clearing cancels one still waiting.
  const noticeRuns = { status: 0, error: 0 };

  function notice(id, text) {
    const box = $(id);
    const run = ++noticeRuns[id];
    box.textContent = "";
    box.hidden = !text;
    if (text) window.setTimeout(() => run === noticeRuns[id] && (box.textContent = text), 50);
  }

  const say = (text) => notice("status", text);

  function fail(error, doing) {
    if (error && error.handled) return;
    const text = error instanceof ApiError ? error.describe() : String(error);
    notice("error", `Could not ${doing}: ${text}`);
  }

  function clearNotices() {
    for (const id of ["status", "error"]) {
      noticeRuns[id]++;
      $(id).textContent = "";
      $(id).hidden = true;
    }
  }

  // Runs one action of the user: notices cleared first, its error shown if it fails, and
  // the button that started it refusing more presses meanwhile (no double submits). The
  // button is marked aria-disabled rather than disabled, which would take the keyboard's
  // focus away from it.
  async function act(doing, button, work) {
    if (button && button.getAttribute("aria-disabled") === "true") return;
    clearNotices();
    if (button) button.setAttribute("aria-disabled", "true");
    try {
      await work();
    } catch (error) {
      fail(error, doing);
    } finally {
      if (button) button.removeAttribute("aria-disabled");
    }
  }

  // ---- Small builders --------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function button(text, label, onClick, className = "button-small") {
    const b = el("button", { type: "button", text, class: className, "aria-label": label });
    b.addEventListener("click", () => onClick(b));
    return b;
  }

  // Unix seconds, or an RFC 3339 string, as "2026-11-29 23:41:07" (UTC).
  function when(value) {
    if (value === null || value === undefined) return el("span", { class: "muted", text: "never" });
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    if (Number.isNaN(date.getTime())) return document.createTextNode(String(value));
    const iso = date.toISOString();
    return el("time", { dateTime: iso, text: `${iso.slice(0, 10)} ${iso.slice(11, 19)}` });
  }

  function emptyRow(body, columns, text) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: columns, class: "muted", text })));
  }

  function confirmWith(title, text, yes) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = yes;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.showModal();
    });
  }

  // ---- Signing in and out ----------------------------------------------------------------

  const isAdmin = () => me && me.role === "admin";

  async function signIn(event) {
    event.preventDefault();
    const form = event.target;
    const submit = form.querySelector("button[type=submit]");
    await act("sign in", submit, async () => {
      const answer = await call("POST", "auth/login", {
        username: form.username.value,
        password: form.password.value,
      });
      token = answer.token;
      session++;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.password.value = "";
      me = await call("GET", "api/me");
      if (!VIEWS.includes(location.hash.slice(1))) history.replaceState(null, "", "#dashboard");
      render(true);
      say(`Signed in as ${me.username} (${me.role}).`);
    });
  }

  async function signOut(b) {
    await act("sign out", b, async () => {
      try {
        await call("POST", "auth/logout");
      } finally {
        endSession("Signed out.");
      }
    });
  }

  // Forgets the token and everything the API showed, and returns to the sign-in form.
  // Requests still in flight are dropped when they answer (see `call`).
  function endSession(message) {
    session++;
    token = null;
    me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopHealth();
    lastHealth = null;
    users = [];
    editing = null;
    auditEvents = [];
    auditNext = null;
    for (const id of ["users-rows", "keys-rows", "audit-rows"]) $(id).replaceChildren();
    const fields = ["me-username", "me-role", "me-active", "count", "health-backends", "health-redis", "health-rps"];
    for (const id of fields) {
      $(id).textContent = "…";
      $(id).classList.remove("bad");
    }
    for (const id of ["hello", "whoami-short"]) $(id).textContent = "";
    for (const id of ["me-error", "count-error", "health-error"]) {
      $(id).textContent = "";
      $(id).hidden = true;
      delete $(id).dataset.failure;
    }
    hideKey();
    $("user-edit-form").hidden = true;
    $("user-edit-title").textContent = "Change a user";
    for (const id of ["user-create-form", "user-edit-form", "key-create-form", "audit-filter-form"]) $(id).reset();
    $("audit-more").hidden = true;
    if ($("confirm").open) $("confirm").close("no");
    shownView = null;
    render(true);
    if (message) say(message);
  }

  // ---- Views -----------------------------------------------------------------------------

  const isView = (hash) => VIEWS.includes(hash.slice(1));

  // The view the address names; while it names none (it is "#content" after the skip link),
  // the one on show.
  function currentView() {
    const wanted = isView(location.hash) ? location.hash.slice(1) : shownView || "dashboard";
    if (ADMIN_VIEWS.includes(wanted) && !isAdmin()) return "dashboard";
    return wanted;
  }

  // Shows the one view the address names (or the sign-in form), and loads what it shows.
  // `moveFocus` puts keyboard focus on its heading, as a page change would.
  function render(moveFocus) {
    const signedIn = Boolean(me);
    $("sign-in").hidden = signedIn;
    $("nav").hidden = !signedIn;
    $("session").hidden = !signedIn;
    for (const node of document.querySelectorAll(".admin-only:not(.view)")) {
      node.hidden = !isAdmin();
    }
    if (!signedIn) {
      for (const name of VIEWS) $(name).hidden = true;
      document.title = "Sign in — gatehouse console";
      // Signing in is the one thing to do here: the keyboard starts in its first field.
      $("sign-in-username").focus();
      return;
    }
    $("whoami-short").textContent = `${me.username} (${me.role})`;
    const view = currentView();
    shownView = view;
    if (!isView(location.hash)) history.replaceState(null, "", `#${view}`);
    for (const name of VIEWS) $(name).hidden = name !== view;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.getAttribute("href") === `#${view}`) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const heading = $(`${view}-title`);
    document.title = `${heading.textContent} — gatehouse console`;
    if (moveFocus) heading.focus();
    if (view !== "dashboard") stopHealth();
    // A new key is shown once, in its view: leaving the view forgets it.
    if (view !== "keys") hideKey();
    LOADERS[view]();
  }

  const LOADERS = {
    dashboard: loadDashboard,
    users: () => act("list the users", null, loadUsers),
    keys: () => act("list the keys", null, loadKeys),
    audit: () => act("read the audit log", null, () => loadAudit(false)),
  };

  // ---- Dashboard -------------------------------------------------------------------------

  // Each card loads on its own and says below what failed, so one failing endpoint leaves the
  // others readable.
  // (The error boxes are alerts. One already showing is rewritten only when the failure
  // changes, not for each new request id, so that a poll failing the same way again is not
  // read out again.)
  async function card(errorId, work) {
    const box = $(errorId);
    try {
      await work();
      box.hidden = true;
      box.textContent = "";
      delete box.dataset.failure;
    } catch (error) {
      if (error.handled) return;
      const api = error instanceof ApiError;
      const failure = api ? `${error.status} ${error.code} ${error.message}` : String(error);
      if (box.hidden || box.dataset.failure !== failure) {
        box.textContent = `Unavailable: ${api ? error.describe() : error}`;
        box.dataset.failure = failure;
      }
      box.hidden = false;
    }
  }

  function loadDashboard() {
    card("me-error", async () => {
      me = await call("GET", "api/me");
      $("me-username").textContent = me.username;
      $("me-role").textContent = me.role;
      $("me-active").textContent = me.active ? "yes" : "no";
      $("hello").textContent = (await call("GET", "api/hello")).message;
    });
    countVisit();
    if (isAdmin()) startHealth();
  }

  function countVisit() {
    return card("count-error", async () => {
      $("count").textContent = String((await call("GET", "api/count")).visits);
    });
  }

  // Each start of the polling is a new run; a poll of an older run (one in flight when the
  // dashboard was left or drawn again) schedules nothing.
  let healthRun = 0;

  function startHealth() {
    stopHealth();
    lastHealth = null;
    for (const id of ["health-backends", "health-redis", "health-rps"]) {
      $(id).textContent = "…";
      $(id).classList.remove("bad");
    }
    $("health-interval").textContent = String(HEALTH_EVERY_MS / 1000);
    pollHealth(healthRun);
  }

  function stopHealth() {
    healthRun++;
    if (healthTimer !== null) window.clearTimeout(healthTimer);
    healthTimer = null;
  }

  async function pollHealth(run) {
    healthTimer = null;
    let measuring = false;
    await card("health-error", async () => {
      const status = await call("GET", "api/status");
      $("health-redis").textContent = status.redis;
      $("health-redis").classList.toggle("bad", status.redis !== "up");
      // The backends and the requests come from the proxy's admin listener: null when it is
      // off or did not answer the backend in time.
      const backends = status.backends;
      $("health-backends").textContent = backends
        ? `${backends.in_rotation} of ${backends.total}`
        : "unknown (no answer from the admin listener)";
      $("health-backends").classList.toggle("bad", !backends || backends.in_rotation < backends.total);
      const total = status.requests_total;
      const previous = lastHealth;
      lastHealth = typeof total === "number" ? { total, time: status.time_ms } : null;
      if (!lastHealth) {
        $("health-rps").textContent = "unknown";
        return;
      }
      // The first answer, or the counter restarted: one more poll is needed.
      measuring = !previous || total < previous.total || status.time_ms <= previous.time;
      $("health-rps").textContent = measuring
        ? "measuring…"
        : (((total - previous.total) * 1000) / (status.time_ms - previous.time)).toFixed(1);
    });
    if (!$("health-error").hidden) {
      for (const id of ["health-backends", "health-redis", "health-rps"]) $(id).textContent = "unknown";
      lastHealth = null;
    }
    if (run === healthRun && isAdmin() && currentView() === "dashboard") {
      healthTimer = window.setTimeout(
        () => pollHealth(run),
        measuring ? HEALTH_FIRST_MS : HEALTH_EVERY_MS,
      );
    }
  }

  // ---- Users -----------------------------------------------------------------------------

  async function loadUsers() {
    users = (await call("GET", "api/users")).users;
    const body = $("users-rows");
    if (!users.length) return emptyRow(body, 4, "No users.");
    body.replaceChildren(
      ...users.map((user) => {
        const self = me && user.username === me.username;
        const actions = el(
          "td",
          { class: "actions" },
          button("Edit", `Edit ${user.username}`, () => openEdit(user)),
          user.active
            ? button("Disable", `Disable ${user.username}`, (b) => changeUser(user, { active: false }, b, "disabled"))
            : button("Enable", `Enable ${user.username}`, (b) => changeUser(user, { active: true }, b, "enabled")),
          button("Delete", `Delete ${user.username}`, (b) => deleteUser(user, b), "button-small button-danger"),
        );
        for (const b of actions.querySelectorAll("button")) b.dataset.user = user.username;
        return el(
          "tr",
          { "data-user": user.username },
          el("th", { scope: "row", text: user.username + (self ? " (you)" : "") }),
          el("td", { text: user.role }),
          el("td", { class: user.active ? "ok" : "bad", text: user.active ? "active" : "disabled" }),
          actions,
        );
      }),
    );
  }

  // After a change the list is drawn again; focus goes back to the same user's button.
  function refocus(username, label) {
    const row = document.querySelector(`#users-rows tr[data-user="${CSS.escape(username)}"]`);
    const target = row && [...row.querySelectorAll("button")].find((b) => b.textContent === label);
    (target || $("users-title")).focus();
  }

  async function changeUser(user, change, b, done) {
    await act(`change ${user.username}`, b, async () => {
      const changed = await call("PUT", `api/users/${encodeURIComponent(user.username)}`, change);
      await loadUsers();
      refocus(changed.username, changed.active ? "Disable" : "Enable");
      say(`${changed.username} ${done}: ${changed.role}, ${changed.active ? "active" : "disabled"}.`);
    });
  }

  async function deleteUser(user, b) {
    const sure = await confirmWith(
      `Delete ${user.username}?`,
      `${user.username} and every token of theirs stop working at once. This cannot be undone.`,
      `Delete ${user.username}`,
    );
    if (!sure) return b.focus();
    await act(`delete ${user.username}`, b, async () => {
      await call("DELETE", `api/users/${encodeURIComponent(user.username)}`);
      await loadUsers();
      $("users-title").focus();
      say(`${user.username} deleted.`);
    });
  }

  function openEdit(user) {
    editing = user;
    const form = $("user-edit-form");
    $("user-edit-title").textContent = `Change ${user.username}`;
    form.role.value = user.role;
    form.password.value = "";
    form.active.checked = user.active;
    form.hidden = false;
    $("user-edit-title").focus();
  }

  function closeEdit() {
    const user = editing;
    editing = null;
    $("user-edit-form").hidden = true;
    if (user) refocus(user.username, "Edit");
  }

  async function saveEdit(event) {
    event.preventDefault();
    const form = event.target;
    const user = editing;
    if (!user) return;
    const change = {};
    if (form.role.value !== user.role) change.role = form.role.value;
    if (form.active.checked !== user.active) change.active = form.active.checked;
    if (form.password.value) change.password = form.password.value;
    if (!Object.keys(change).length) {
      say("Nothing to change.");
      return;
    }
    await act(`change ${user.username}`, form.querySelector("button[type=submit]"), async () => {
      const changed = await call("PUT", `api/users/${encodeURIComponent(user.username)}`, change);
      form.password.value = "";
      await loadUsers();
      closeEdit();
      const what = Object.keys(change).join(", ");
      say(`${changed.username} changed (${what}): ${changed.role}, ${changed.active ? "active" : "disabled"}.`);
    });
  }

  async function createUser(event) {
    event.preventDefault();
    const form = event.target;
    await act("create the user", form.querySelector("button[type=submit]"), async () => {
      const created = await call("POST", "api/users", {
        username: form.username.value,
        password: form.password.value,
        role: form.role.value,
        active: form.active.checked,
      });
      form.reset();
      await loadUsers();
      say(`${created.username} created: ${created.role}, ${created.active ? "active" : "disabled"}.`);
    });
  }

  // ---- API keys --------------------------------------------------------------------------

  async function loadKeys() {
    const keys = (await call("GET", "api/keys")).keys;
    keys.sort((a, b) => b.created - a.created);
    const body = $("keys-rows");
    if (!keys.length) return emptyRow(body, 6, "No keys.");
    body.replaceChildren(
      ...keys.map((key) =>
        el(
          "tr",
          { "data-key": key.id },
          el("th", { scope: "row", text: key.name }),
          el("td", { text: key.role }),
          el("td", {}, when(key.created)),
          el("td", {}, when(key.last_used)),
          el("td", {}, el("code", { text: key.id })),
          el(
            "td",
            { class: "actions" },
            button("Revoke", `Revoke the key ${key.name} (${key.id})`, (b) => revokeKey(key, b), "button-small button-danger"),
          ),
        ),
      ),
    );
  }

  async function createKey(event) {
    event.preventDefault();
    const form = event.target;
    await act("create the key", form.querySelector("button[type=submit]"), async () => {
      const key = await call("POST", "api/keys", {
        name: $("key-create-name").value,
        role: $("key-create-role").value,
      });
      form.reset();
      $("key-shown-value").value = key.key;
      $("key-shown-name").textContent = `"${key.name}" (${key.id})`;
      $("key-shown-role").textContent = key.role;
      $("key-shown").hidden = false;
      await loadKeys();
      $("key-shown-title").focus();
      say(`Key ${key.name} created. Copy it now: it is not shown again.`);
    });
  }

  function hideKey() {
    $("key-shown-value").value = "";
    $("key-shown-name").textContent = "";
    $("key-shown-role").textContent = "";
    $("key-shown").hidden = true;
  }

  async function copyKey() {
    const input = $("key-shown-value");
    input.focus();
    input.select();
    try {
      await navigator.clipboard.writeText(input.value);
      say("The key is on the clipboard.");
    } catch {
      say("The key is selected: copy it with Ctrl+C (Cmd+C).");
    }
  }

  async function revokeKey(key, b) {
    const sure = await confirmWith(
      `Revoke ${key.name}?`,
      `Requests with the key ${key.name} (${key.id}) are refused from now on. This cannot be undone.`,
      "Revoke the key",
    );
    if (!sure) return b.focus();
    await act(`revoke ${key.name}`, b, async () => {
      await call("DELETE", `api/keys/${encodeURIComponent(key.id)}`);
      await loadKeys();
      $("keys-title").focus();
      say(`Key ${key.name} revoked.`);
    });
  }

  // ---- Audit log -------------------------------------------------------------------------

  async function loadAudit(more) {
    let path = `api/audit?limit=${AUDIT_PAGE}`;
    if (more && auditNext !== null) path += `&before=${encodeURIComponent(auditNext)}`;
    const page = await call("GET", path);
    auditEvents = more ? auditEvents.concat(page.events) : page.events;
    auditNext = page.next_before === undefined ? null : page.next_before;
    $("audit-more").hidden = auditNext === null;
    drawAudit();
    return page.events.length;
  }

  // A detail is mostly words; one the API gives as an object or a list is shown as JSON.
  const detailText = (detail) => (typeof detail === "object" ? JSON.stringify(detail) : String(detail));

  function drawAudit() {
    const filter = $("audit-filter").value.trim().toLowerCase();
    const shown = auditEvents.filter(
      (e) => !filter || [e.event, e.actor, e.target].some((v) => v && String(v).toLowerCase().includes(filter)),
    );
    const body = $("audit-rows");
    if (!shown.length) return emptyRow(body, 7, filter ? "No loaded event matches." : "No events.");
    const dash = () => el("span", { class: "muted", text: "—" });
    body.replaceChildren(
      ...shown.map((e) =>
        el(
          "tr",
          { "data-event": e.event, "data-id": String(e.id) },
          el("td", {}, when(e.time)),
          el(
            "th",
            { scope: "row" },
            el("code", { text: e.event }),
            // A few words more, where the API has them (the fields a change touched, ...).
            e.detail ? el("span", { class: "detail", text: ` ${detailText(e.detail)}` }) : "",
          ),
          el("td", {}, e.actor ? e.actor : dash()),
          el("td", {}, e.target ? e.target : dash()),
          el("td", { class: e.outcome === "success" ? "ok" : "bad", text: e.outcome }),
          el("td", {}, e.client ? e.client : dash()),
          el("td", {}, e.request_id ? el("code", { text: e.request_id }) : dash()),
        ),
      ),
    );
  }

  // "Skip to content" and "Back to top": the focus goes to the main content, and the view stays
  // (the address keeps naming it).
  function toContent() {
    const main = $("content");
    main.focus({ preventScroll: true });
    main.scrollIntoView({ block: "start" });
  }

  // ---- Wiring ----------------------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", (e) => signOut(e.currentTarget));
    $("dashboard-refresh").addEventListener("click", () => {
      clearNotices();
      loadDashboard();
      say("Dashboard refreshed.");
    });
    $("count-again").addEventListener("click", () => countVisit());
    $("user-create-form").addEventListener("submit", createUser);
    $("user-edit-form").addEventListener("submit", saveEdit);
    $("user-edit-cancel").addEventListener("click", closeEdit);
    $("user-edit-form").addEventListener("keydown", (e) => {
      if (e.key === "Escape") closeEdit();
    });
    $("key-create-form").addEventListener("submit", createKey);
    $("key-copy").addEventListener("click", copyKey);
    $("key-dismiss").addEventListener("click", () => {
      hideKey();
      $("keys-title").focus();
    });
    $("audit-filter-form").addEventListener("submit", (e) => {
      e.preventDefault();
      drawAudit();
      say(`${$("audit-rows").querySelectorAll("tr[data-event]").length} events shown.`);
    });
    $("audit-filter").addEventListener("input", drawAudit);
    $("audit-refresh").addEventListener("click", (e) =>
      act("read the audit log", e.currentTarget, async () => {
        const count = await loadAudit(false);
        say(`${count} latest events loaded.`);
      }),
    );
    $("audit-more").addEventListener("click", (e) =>
      act("read older events", e.currentTarget, async () => {
        const count = await loadAudit(true);
        say(`${count} older events loaded.`);
      }),
    );
    for (const link of document.querySelectorAll("a[href='#content']")) {
      link.addEventListener("click", (e) => {
        e.preventDefault();
        toContent();
      });
    }
    // Only a view's name changes the view; any other fragment (typed, or followed from
    // elsewhere) is the main content, and the address goes back to naming the view.
    window.addEventListener("hashchange", () => {
      if (!isView(location.hash)) {
        if (me && shownView) history.replaceState(null, "", `#${shownView}`);
        toContent();
        return;
      }
      clearNotices();
      render(true);
    });
  }

  async function start() {
    wire();
    if (token) {
      try {
        me = await call("GET", "api/me");
      } catch (error) {
        fail(error, "resume the session");
      }
    }
    render(false);
    document.body.classList.add("ready");
  }

  start();
})();
