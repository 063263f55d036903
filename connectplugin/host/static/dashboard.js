// The host's dashboard: plain JavaScript, no framework, nothing loaded from elsewhere.
// The operator token lives in this closure only: taken from the URL fragment (which
// browsers never send to a server, nor put in a Referer) or the form, never stored.
"use strict";
(() => {
  const WATCH = "../connectplugin.v1.ServiceRegistry/WatchService";
  const API = "api/plugins";
  const POLL_MS = 2000;
  const RETRY_MS = [500, 1000, 2000, 5000, 10000];
  const FLAG_END_STREAM = 0x02;
  const FLAG_COMPRESSED = 0x01;

  let token = "";
  let generation = 0; // bumped on sign-in/out: loops of an older one stop
  const services = new Map(); // service type -> {state, provider, version}
  let lastCounts = null; // {at, byPlugin: Map(runtimeId -> {router, host})}

  const $ = (id) => document.getElementById(id);

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: "Bearer " + token }, extra || {});
  }

  // --- the registry's watch: a Connect server stream, JSON codec -------------------------

  function envelope(flags, bytes) {
    const out = new Uint8Array(5 + bytes.length);
    out[0] = flags;
    new DataView(out.buffer).setUint32(1, bytes.length, false);
    out.set(bytes, 5);
    return out;
  }

  class Refused extends Error {}

  async function watchOnce(gen) {
    const body = envelope(0, new TextEncoder().encode(JSON.stringify({ serviceType: "" })));
    const res = await fetch(WATCH, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1" }),
      body,
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    if (res.status !== 200) {
      const err = await res.json().catch(() => ({}));
      throw errorFrom(err, "HTTP " + res.status);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = new Uint8Array(0);
    services.clear(); // the stream starts with the current state of every type
    for (;;) {
      const { value, done } = await reader.read();
      if (gen !== generation) { reader.cancel(); return; }
      if (done) throw new Error("the watch ended without its end message");
      const joined = new Uint8Array(buf.length + value.length);
      joined.set(buf);
      joined.set(value, buf.length);
      buf = joined;
      while (buf.length >= 5) {
        const flags = buf[0];
        const size = new DataView(buf.buffer, buf.byteOffset).getUint32(1, false);
        if (buf.length < 5 + size) break;
        const payload = buf.subarray(5, 5 + size);
        buf = buf.slice(5 + size);
        if (flags & FLAG_COMPRESSED) throw new Error("compressed message (not asked for)");
        const message = JSON.parse(decoder.decode(payload));
        if (flags & FLAG_END_STREAM) {
          if (message.error) throw errorFrom(message.error, "the watch ended");
          return; // ended cleanly (the host closing): watch again
        }
        applyEvent(message);
        setStatus("live", "live");
      }
    }
  }

  function errorFrom(err, fallback) {
    const text = (err.code || fallback) + (err.message ? ": " + err.message : "");
    return err.code === "unauthenticated" || err.code === "permission_denied" ? new Refused(text) : new Error(text);
  }

  async function watch(gen) {
    let attempt = 0;
    while (gen === generation) {
      try {
        await watchOnce(gen);
        attempt = 0;
      } catch (e) {
        if (gen !== generation) return;
        if (e instanceof Refused) { refused(e.message); return; }
        setStatus("error", "reconnecting: " + e.message);
      }
      await new Promise((r) => setTimeout(r, RETRY_MS[Math.min(attempt++, RETRY_MS.length - 1)]));
    }
  }

  function stateName(state) {
    return String(state || "SERVICE_STATE_UNSPECIFIED").replace("SERVICE_STATE_", "").toLowerCase();
  }

  function applyEvent(event) {
    const endpoint = event.endpoint || {};
    services.set(event.serviceType || "", {
      state: stateName(event.state),
      provider: endpoint.providerId || "",
      version: endpoint.version || "",
    });
    renderServices();
  }

  function cell(row, text, attrs) {
    const td = document.createElement("td");
    td.textContent = text;
    for (const [k, v] of Object.entries(attrs || {})) td.setAttribute(k, v);
    row.appendChild(td);
    return td;
  }

  function renderServices() {
    const tbody = $("services").tBodies[0];
    const rows = [];
    for (const type of [...services.keys()].sort()) {
      const s = services.get(type);
      const tr = document.createElement("tr");
      tr.dataset.service = type;
      tr.dataset.state = s.state;
      cell(tr, type);
      cell(tr, s.state, { "data-state": s.state, class: "state" });
      cell(tr, s.provider, { class: "provider" });
      cell(tr, s.version, { class: "version" });
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  // --- plugins and call rates: polled -------------------------------------------------------

  async function poll(gen) {
    while (gen === generation) {
      try {
        const res = await fetch(API, { headers: authHeaders(), cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
        if (gen !== generation) return;
        if (res.status === 401 || res.status === 403) {
          refused(errorFrom(await res.json().catch(() => ({})), "HTTP " + res.status).message);
          return;
        }
        if (res.ok) renderPlugins(await res.json());
      } catch (e) {
        // The host is away; the watch says so. Try again at the next tick.
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  function renderPlugins(data) {
    const now = performance.now();
    const counts = new Map();
    const tbody = $("plugins").tBodies[0];
    const rows = [];
    for (const p of data.plugins) {
      counts.set(p.runtime_id, p.calls);
      const before = lastCounts && lastCounts.byPlugin.get(p.runtime_id);
      const seconds = lastCounts ? (now - lastCounts.at) / 1000 : 0;
      const rate = (via) => (before && seconds > 0 ? ((p.calls[via] - before[via]) / seconds).toFixed(1) : "-");
      const health = String(p.health).toLowerCase();
      const tr = document.createElement("tr");
      tr.dataset.plugin = p.name;
      tr.dataset.runtimeId = p.runtime_id;
      cell(tr, p.name);
      cell(tr, p.runtime_id);
      cell(tr, p.version);
      cell(tr, health + (p.reason ? ": " + p.reason : ""), { "data-health": health, class: "health" });
      const provided = p.services.filter((s) => s.registered);
      cell(tr, provided.map((s) => s.service_type + " " + s.version).join(", "), { class: "services" });
      cell(tr, data.metrics ? rate("router") : "-", { class: "num rate-router" });
      cell(tr, data.metrics ? rate("host") : "-", { class: "num rate-host" });
      cell(tr, data.metrics ? String(p.errors.router + p.errors.host) : "-", { class: "num errors" });
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    $("rates-note").textContent = data.metrics ? "" : "(call rates need HostConfig.metrics)";
    lastCounts = { at: now, byPlugin: counts };
  }

  // --- signing in and out -------------------------------------------------------------------

  function refused(why) {
    generation++;
    token = "";
    services.clear();
    $("board").hidden = true;
    $("login").hidden = false;
    setStatus("refused", "refused: " + why);
  }

  function start(newToken) {
    token = newToken;
    generation++;
    lastCounts = null;
    $("login").hidden = true;
    $("board").hidden = false;
    setStatus("connecting", "connecting");
    watch(generation);
    poll(generation);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("token");
      const value = input.value.trim();
      input.value = "";
      if (value) start(value);
    });
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (match) {
      // Out of the address bar and the history at once.
      history.replaceState(null, "", location.pathname + location.search);
      start(decodeURIComponent(match[1]));
    }
  });
})();
