// migrating-proxy console: fills the server-rendered pages from /api/v1 and keeps them live.
// Plain DOM, no framework, no build step. Text goes in with textContent only (never as HTML).
"use strict";

const POLL_MS = 2000;
const PAGE_SIZE = 50;
const csrfToken = () => document.querySelector('meta[name="csrf-token"]').content;

// -- talking to the API ------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (method !== "GET") init.headers["X-CSRF-Token"] = csrfToken();
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { location.reload(); throw new ApiError(401, null); }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, total: Number(response.headers.get("X-Total-Count")) };
}

// Run `load` now and every POLL_MS after each load ends; `refresh()` runs it at once.
function poller(load) {
  let timer = null;
  const tick = async () => {
    clearTimeout(timer);
    try { await load(); } catch (error) { if (error.status !== 401) flash(error.message, true); }
    timer = setTimeout(tick, POLL_MS);
  };
  tick();
  return { refresh: tick };
}

// -- small DOM helpers -------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function flash(message, isError = false) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = isError ? "error show" : "show";
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.className = ""; }, 6000);
}

function confirmDialog(question) {
  const dialog = document.getElementById("confirm");
  dialog.querySelector(".question").textContent = question;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

function download(name, type, text) {
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(link);
  link.click();
  link.remove();
}

const fmt = {
  bytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
  },
  time(iso) { return iso ? new Date(iso).toLocaleString() : "–"; },
  count(n) { return Number(n).toLocaleString(); },
};

function progressBar(done, total, state) {
  const percent = total ? Math.floor((100 * done) / total) : (state === "COMPLETED" ? 100 : 0);
  const fill = el("span");
  fill.style.width = `${percent}%`; // through the CSSOM: the CSP allows no inline style
  return el("div", { class: "bar", dataset: { state: state || "", percent: String(percent) },
                     title: `${done} of ${total}` }, fill, el("em", {}, `${percent}%`));
}

function stateBadge(state, jobState) {
  return el("span", { class: `badge ${String(state).toLowerCase()}` }, state || "local",
    jobState ? el("small", {}, ` ${jobState}`) : null);
}

function table(headers, rows) {
  return el("table", { class: "grid compact" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

function outcomesTable(outcomes) {
  return table(["Address", "Result", "Reason"],
    outcomes.map((o) => [o.address, o.result, o.reason || ""]));
}

// -- domains page ------------------------------------------------------------------------
const DOMAIN_KEYS = new Set(["name", "source_url", "relay_url", "type", "migrating"]);

function domainSwitch(domain, onChange) {
  const on = domain.migrating;
  return el("button", {
    type: "button", role: "switch", "aria-checked": String(on), class: `switch ${on ? "on" : "off"}`,
    dataset: { domain: domain.name },
    onclick: async () => {
      const question = on
        ? `Switch migration OFF for ${domain.name}? Unknown users will be refused at login.`
        : `Switch migration ON for ${domain.name}? Users not seen yet are checked against the old server at login and migrated.`;
      if (!(await confirmDialog(question))) return;
      try {
        await api("POST", `/api/v1/domains/${encodeURIComponent(domain.name)}/${on ? "disable" : "enable"}`);
        flash(`Migration ${on ? "off" : "on"} for ${domain.name}`);
      } catch (error) { flash(error.message, true); }
      onChange();
    },
  }, on ? "on" : "off");
}

// Options a domain carries beyond the columns of the table: whatever its JSON holds (long
// values, a CA certificate say, shortened; the whole value in the tooltip).
function domainOptions(domain) {
  return Object.entries(domain).filter(([key]) => !DOMAIN_KEYS.has(key)).map(([key, value]) => {
    const text = String(Array.isArray(value) ? value.join(", ") : value);
    const short = text.length > 40 ? `${text.slice(0, 37).split("\n")[0]}…` : text;
    return el("div", { class: "opt", title: text }, `${key}: ${short}`);
  });
}

function stateCounts(totals) {
  return el("div", { class: "states" },
    Object.entries(totals.states).map(([state, n]) => el("span", { class: `badge ${state.toLowerCase()}`, title: state }, `${state} ${n}`)));
}

function domainsPage() {
  const body = document.querySelector("#domains tbody");
  const view = poller(async () => {
    const [domains, totals] = await Promise.all([api("GET", "/api/v1/domains"), api("GET", "/api/v1/totals")]);
    const rows = domains.data.map((d) => {
      const t = totals.data[d.name];
      const done = t.messages_copied + t.messages_skipped;
      return el("tr", { dataset: { domain: d.name } },
        el("td", {}, el("a", { href: `/domains/${encodeURIComponent(d.name)}` }, d.name)),
        el("td", {}, (d.sources || [d.source_url]).join(" ")), el("td", {}, d.relay_url || "–"),
        el("td", {}, d.type), el("td", { class: "options" }, domainOptions(d)),
        el("td", {}, domainSwitch(d, () => view.refresh())),
        el("td", {}, el("strong", {}, fmt.count(t.accounts)), stateCounts(t)),
        el("td", {}, progressBar(done, t.messages_total, t.states.PENDING ? "PENDING" : "")),
        el("td", {}, `${fmt.count(done)} / ${fmt.count(t.messages_total)}`),
        el("td", {}, fmt.bytes(t.bytes_copied)));
    });
    body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No domain yet: add one below."))]));
  });

  document.getElementById("add-domain").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const value = (name) => form.elements[name].value.trim();
    const body = { name: value("name"), source: value("source"), type: value("type"), source_user: value("source_user") || "%u" };
    for (const optional of ["relay", "pop3_source", "cutover", "engine", "source_ca"]) {
      if (value(optional)) body[optional] = value(optional);
    }
    for (const flag of ["subscribed_only", "no_notice", "no_verify_tls", "disabled"]) body[flag] = form.elements[flag].checked;
    try {
      await api("POST", "/api/v1/domains", body);
      flash(`Domain ${body.name} added`);
      form.reset();
      view.refresh();
    } catch (error) { flash(error.message, true); }
  });
  importForm();
}

function importForm() {
  const form = document.getElementById("import");
  const apply = document.getElementById("import-apply");
  const report = document.getElementById("import-report");
  const send = async (dryRun) => {
    const data = new FormData();
    data.append("file", form.elements.file.files[0]);
    data.append("dry_run", dryRun ? "true" : "false");
    try {
      const { data: summary } = await api("POST", "/api/v1/import", data);
      const verb = summary.dry_run ? "Would import" : "Imported";
      report.replaceChildren(el("p", { class: summary.dry_run ? "ok" : "ok done", id: "import-summary" },
        `${verb} ${summary.created} new account(s), update ${summary.updated} existing account(s) from ${summary.file}.`));
      apply.disabled = !summary.dry_run;
    } catch (error) {
      apply.disabled = true;
      const bad = (error.body && error.body.bad_lines) || [];
      report.replaceChildren(el("p", { class: "error", id: "import-error" }, error.message),
        bad.length ? table(["Line", "Column", "Reason"], bad.map((b) => [b.line, b.column, b.reason])) : "");
    }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); send(true); });
  form.elements.file.addEventListener("change", () => { apply.disabled = true; report.replaceChildren(); });
  apply.addEventListener("click", () => send(false));
}

// -- accounts page -----------------------------------------------------------------------
function accountsPage() {
  const domain = document.getElementById("domain-head").dataset.domain;
  const body = document.querySelector("#accounts tbody");
  const view = { sort: "address", descending: false, state: "", q: "", offset: 0, total: 0 };
  const selected = new Set();
  const lastSample = new Map(); // address -> [time, bytes], for the rate column
  const servedBy = document.querySelector("#accounts th.served-by");

  const rate = (row) => {
    const now = Date.now();
    const before = lastSample.get(row.address);
    lastSample.set(row.address, [now, row.bytes_copied]);
    if (!before || row.job_state !== "running" || now <= before[0]) return "–";
    return `${fmt.bytes(Math.max(0, ((row.bytes_copied - before[1]) * 1000) / (now - before[0])))}/s`;
  };

  const renderRow = (row, showServedBy) => {
    const done = row.messages_copied + row.messages_skipped;
    const box = el("input", { type: "checkbox", checked: selected.has(row.address), "aria-label": `select ${row.address}`,
      onchange: (event) => { event.target.checked ? selected.add(row.address) : selected.delete(row.address); updateSelection(); } });
    return el("tr", { dataset: { address: row.address, state: row.state || "", job: row.job_state || "" } },
      el("td", {}, box), el("td", { class: "address" }, row.address),
      el("td", { class: "state" }, stateBadge(row.state, row.job_state)),
      showServedBy ? el("td", { class: "served-by" }, row.served_by || "–") : null,
      el("td", {}, progressBar(done, row.messages_total, row.state)),
      el("td", {}, `${row.folders_done}/${row.folders_total}`),
      el("td", {}, `${fmt.count(done)}/${fmt.count(row.messages_total)}`, row.messages_skipped ? el("small", {}, ` (${row.messages_skipped} skipped)`) : null),
      el("td", {}, fmt.bytes(row.bytes_copied)), el("td", { class: "rate" }, rate(row)),
      el("td", { class: "last-error" }, row.last_error || ""), el("td", {}, fmt.time(row.last_pass_at)),
      el("td", {}, fmt.time(row.started_at)), el("td", {}, fmt.time(row.finished_at)));
  };

  const query = () => {
    const params = new URLSearchParams({ domain, limit: PAGE_SIZE, offset: view.offset, sort: (view.descending ? "-" : "") + view.sort });
    if (view.state) params.set("state", view.state);
    if (view.q) params.set("q", view.q);
    return `/api/v1/status?${params}`;
  };

  const poll = poller(async () => {
    const [page, domains, totals] = await Promise.all([api("GET", query()), api("GET", "/api/v1/domains"), api("GET", "/api/v1/totals")]);
    view.total = page.total;
    const showServedBy = page.data.some((row) => "served_by" in row);
    servedBy.hidden = !showServedBy;
    body.replaceChildren(...(page.data.length ? page.data.map((row) => renderRow(row, showServedBy))
      : [el("tr", {}, el("td", { colspan: 13, class: "muted" }, "No account matches."))]));
    const last = Math.min(view.offset + PAGE_SIZE, view.total);
    document.getElementById("page-info").textContent = view.total ? `${view.offset + 1}–${last} of ${fmt.count(view.total)}` : "0 accounts";
    document.getElementById("prev").disabled = view.offset === 0;
    document.getElementById("next").disabled = last >= view.total;
    const me = domains.data.find((d) => d.name === domain);
    const t = totals.data[domain];
    if (me && t) {
      const done = t.messages_copied + t.messages_skipped;
      document.getElementById("domain-summary").replaceChildren(
        el("span", {}, "Migration "), domainSwitch(me, () => poll.refresh()), stateCounts(t),
        progressBar(done, t.messages_total, ""), el("span", {}, `${fmt.count(done)} / ${fmt.count(t.messages_total)} messages, ${fmt.bytes(t.bytes_copied)}`),
        el("div", { class: "options" }, domainOptions(me)));
    }
    updateSelection();
  });

  const updateSelection = () => {
    document.getElementById("selected-count").textContent = `${selected.size} selected`;
    for (const button of document.querySelectorAll('#actions [data-scope="selected"]')) button.disabled = selected.size === 0;
    const boxes = [...body.querySelectorAll('input[type="checkbox"]')];
    document.getElementById("select-page").checked = boxes.length > 0 && boxes.every((b) => b.checked);
  };

  const act = async (action, selection) => {
    try {
      const { data } = await api("POST", `/api/v1/${action}`, selection);
      document.getElementById("action-report").replaceChildren(el("h3", {}, `${action}: ${data.length} account(s)`), outcomesTable(data));
      flash(`${action}: done`);
    } catch (error) { flash(error.message, true); }
    poll.refresh();
  };

  for (const button of document.querySelectorAll('#actions [data-scope="selected"]')) {
    button.addEventListener("click", () => act(button.dataset.action, { addresses: [...selected] }));
  }
  document.getElementById("domain-action-run").addEventListener("click", async () => {
    const action = document.getElementById("domain-action").value;
    if (await confirmDialog(`${action} every account of ${domain}?`)) act(action, { domain });
  });
  document.getElementById("select-page").addEventListener("change", (event) => {
    for (const row of body.querySelectorAll("tr[data-address]")) {
      event.target.checked ? selected.add(row.dataset.address) : selected.delete(row.dataset.address);
      row.querySelector("input").checked = event.target.checked;
    }
    updateSelection();
  });
  for (const th of document.querySelectorAll("#accounts th[data-sort]")) {
    th.addEventListener("click", () => {
      view.descending = view.sort === th.dataset.sort ? !view.descending : false;
      view.sort = th.dataset.sort;
      view.offset = 0;
      for (const other of document.querySelectorAll("#accounts th[data-sort]")) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", view.descending ? "descending" : "ascending");
      poll.refresh();
    });
  }
  document.getElementById("state-filter").addEventListener("change", (event) => { view.state = event.target.value; view.offset = 0; poll.refresh(); });
  let typing = null;
  document.getElementById("search").addEventListener("input", (event) => {
    clearTimeout(typing);
    typing = setTimeout(() => { view.q = event.target.value.trim(); view.offset = 0; poll.refresh(); }, 250);
  });
  document.getElementById("filters").addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - PAGE_SIZE); poll.refresh(); });
  document.getElementById("next").addEventListener("click", () => { view.offset += PAGE_SIZE; poll.refresh(); });
  finishButton(domain, poll);
}

function finishButton(domain, poll) {
  const box = document.getElementById("finish-report");
  document.getElementById("finish").addEventListener("click", async () => {
    if (!(await confirmDialog(`Finish the migration of ${domain}: run a final pass, then refuse unknown users and stop relaying to the old server?`))) return;
    box.replaceChildren(el("p", { class: "muted" }, "Finishing: waiting for the final passes…"));
    try {
      const { data: report } = await api("POST", "/api/v1/finish", { domain, confirm: true });
      box.replaceChildren(
        el("p", { class: "ok", id: "finish-summary" }, `${report.domain}: migration switched off. ${report.accounts} account(s), ${report.migrated.length} migrated, ${report.errors.length} with errors, ${report.never_migrated.length} never migrated; ${report.messages_copied} messages copied, ${report.messages_skipped} skipped.`),
        report.errors.length ? table(["Address", "Error"], report.errors.map((e) => [e.address, e.last_error])) : "",
        el("p", {},
          el("button", { type: "button", id: "report-json", class: "secondary", onclick: () => download(`${domain}-finish.json`, "application/json", JSON.stringify(report, null, 2)) }, "Download report (JSON)"), " ",
          el("button", { type: "button", id: "report-csv", class: "secondary", onclick: () => download(`${domain}-finish.csv`, "text/csv", reportCsv(report)) }, "Download report (CSV)")));
    } catch (error) {
      box.replaceChildren(el("p", { class: "error" }, error.message));
    }
    poll.refresh();
  });
}

// The finish report as CSV: one line per account, then one per skipped message.
function reportCsv(report) {
  const quote = (value) => `"${String(value ?? "").replaceAll('"', '""')}"`;
  const lines = [["address", "result", "detail"]];
  for (const a of report.migrated) lines.push([a, "migrated", ""]);
  for (const e of report.errors) lines.push([e.address, "error", e.last_error]);
  for (const a of report.never_migrated) lines.push([a, "never_migrated", ""]);
  for (const a of report.unfinished) lines.push([a, "unfinished", ""]);
  for (const a of report.no_final_pass) lines.push([a, "no_final_pass", "no stored password"]);
  for (const s of report.skipped) lines.push([s.address, "skipped_message", `${s.folder} ${s.message}: ${s.reason}`]);
  return lines.map((line) => line.map(quote).join(",")).join("\r\n") + "\r\n";
}

// -- audit page --------------------------------------------------------------------------
function auditPage() {
  const body = document.querySelector("#audit tbody");
  let offset = 0;
  const poll = poller(async () => {
    const { data, total } = await api("GET", `/api/v1/audit?limit=${PAGE_SIZE}&offset=${offset}`);
    body.replaceChildren(...data.map((e) => el("tr", { dataset: { action: e.action } },
      el("td", {}, fmt.time(e.at)), el("td", {}, e.who), el("td", {}, e.via), el("td", {}, e.action),
      el("td", { class: "details" }, Object.entries(e.details).map(([k, v]) => el("div", {}, `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`))))));
    document.getElementById("page-info").textContent = total ? `${offset + 1}–${Math.min(offset + PAGE_SIZE, total)} of ${total}` : "nothing yet";
    document.getElementById("prev").disabled = offset === 0;
    document.getElementById("next").disabled = offset + PAGE_SIZE >= total;
  });
  document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE_SIZE); poll.refresh(); });
  document.getElementById("next").addEventListener("click", () => { offset += PAGE_SIZE; poll.refresh(); });
}

const PAGES = { domains: domainsPage, accounts: accountsPage, audit: auditPage };
document.addEventListener("DOMContentLoaded", () => {
  const start = PAGES[document.body.dataset.page];
  if (start) start();
});
