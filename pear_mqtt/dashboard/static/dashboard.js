// The dashboard page: polls the JSON endpoints and redraws. Read-only.
"use strict";
(function () {
  const POLL_MS = 3000;
  const $ = (sel) => document.querySelector(sel);

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    return td;
  }

  function badge(ok, text, warn) {
    const span = document.createElement("span");
    span.className = "badge " + (ok ? "ok" : warn ? "warn" : "bad");
    span.textContent = text;
    return span;
  }

  function rows(tbody, items, build) {
    tbody.replaceChildren(...items.map((item) => {
      const tr = document.createElement("tr");
      build(tr, item);
      return tr;
    }));
  }

  async function get(path) {
    const response = await fetch(path, { cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function showHealth(h) {
    const overall = $("#overall");
    overall.className = "badge " + (h.healthy ? "ok" : "bad");
    overall.textContent = h.healthy ? "healthy" : `not healthy (${h.state})`;
    const b = $("#brokers-healthy");
    b.textContent = `${h.brokers_healthy}/${h.brokers} brokers healthy · ${h.backend} backend`;
    b.dataset.healthy = h.brokers_healthy;
    rows($("#health tbody"), h.components, (tr, c) => {
      tr.dataset.kind = c.kind;
      tr.dataset.ok = c.ok;
      tr.append(cell(`${c.kind} ${c.name}`));
      const state = document.createElement("td");
      state.append(badge(c.ok, c.ok ? "healthy" : "failing"));
      tr.append(state, cell(c.pid), cell(c.detail, "detail"));
    });
  }

  function showCounters(data) {
    rows($("#counters tbody"), data.components, (tr, c) => {
      tr.append(cell(`${c.kind} ${c.name}`));
      const s = c.status;
      const health = document.createElement("td");
      health.append(s.error ? badge(false, s.error) : badge(s.health === "ok", s.health || "?", true));
      const values = Object.entries(s.values || {}).map(([k, v]) => `${k}=${v}`).join("  ");
      tr.append(health, cell(values, "detail"));
    });
    const metrics = $("#metrics");
    metrics.replaceChildren(...Object.entries(data.metrics).map(([name, m]) => {
      const p = document.createElement("p");
      p.className = "detail";
      p.textContent = m.error ? `${name}: ${m.url}: ${m.error}` :
        `${name} (${m.url}): ` + m.samples.slice(0, 12).map((s) => `${s.name}=${s.value}`).join("  ");
      return p;
    }));
  }

  function showCerts(data) {
    rows($("#certs tbody"), data.certificates, (tr, c) => {
      tr.dataset.status = c.status;
      tr.append(cell(c.name), cell(c.subject || c.detail));
      const days = document.createElement("td");
      days.append(badge(c.ok, c.days_left === null ? c.status : `${c.days_left}`, c.status === "expiring"));
      tr.append(days, cell(c.not_after ? c.not_after.slice(0, 10) : null));
    });
  }

  const num = (v) => (typeof v === "number" ? v : NaN);

  function showMarket(m) {
    $("#market-source").textContent = `${m.source}` + (m.reader ? ` as ${m.reader}` : "") +
      ` · ${m.windows} windows` + (m.error ? ` · ${m.error}` : "");
    const charts = $("#charts");
    const figures = [];
    for (const category of m.categories) {
      for (const region of category.regions) {
        const pts = region.points.map((p) => {
          const first = Object.values(p.stats)[0];
          return p.band ? { t: p.t, lo: num(p.band.lo), hi: num(p.band.hi), mid: num(p.band.median) }
            : { t: p.t, lo: NaN, hi: NaN, mid: first ? num(first.mean) : NaN };
        });
        const fig = document.createElement("figure");
        fig.className = "chart";
        fig.dataset.category = category.category;
        const caption = document.createElement("figcaption");
        const last = region.points[region.points.length - 1];
        const currency = last && last.band ? ` (${last.band.field}, ${last.band.currency || ""})` : "";
        caption.textContent = `${category.category} · ${region.region}${currency}`;
        fig.append(caption, PearCharts.band(pts, { label: `${category.category} ${region.region}` }));
        const stats = document.createElement("div");
        stats.className = "stats";
        stats.textContent = last ? `latest window ${last.window_start.slice(0, 10)}: ` +
          Object.entries(last.stats).map(([k, s]) => `${k} mean ${s.mean.toFixed(2)} (${s.companies} companies)`).join("; ") : "";
        fig.append(stats);
        figures.push(fig);
      }
    }
    if (figures.length) charts.replaceChildren(...figures);
  }

  async function refresh() {
    const views = [["/api/health", showHealth], ["/api/counters", showCounters],
      ["/api/certs", showCerts], ["/api/market", showMarket]];
    await Promise.all(views.map(async ([path, show]) => {
      try { show(await get(path)); } catch (err) { console.error(err); }
    }));
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  async function loop() {
    await refresh();
    setTimeout(loop, POLL_MS);
  }
  loop();
})();
