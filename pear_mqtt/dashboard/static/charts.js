// Minimal SVG charts for the dashboard (vendored: the page works offline, no CDN).
// PearCharts.band(points, options) -> <svg>: a shaded band (lo..hi) and a line (mid)
// over time; points are {t, lo, hi, mid} with t in seconds since the epoch.
"use strict";
(function (global) {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function extent(values) {
    const finite = values.filter((v) => typeof v === "number" && isFinite(v));
    if (!finite.length) return [0, 1];
    let lo = Math.min(...finite), hi = Math.max(...finite);
    if (lo === hi) { lo -= 1; hi += 1; }
    const pad = (hi - lo) * 0.08;
    return [lo - pad, hi + pad];
  }

  function fmt(v) {
    const a = Math.abs(v);
    return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function day(t) { return new Date(t * 1000).toISOString().slice(5, 10); }

  function band(points, options) {
    const o = Object.assign({ width: 440, height: 180, label: "" }, options || {});
    const m = { l: 44, r: 8, t: 8, b: 22 };
    const w = o.width - m.l - m.r, h = o.height - m.t - m.b;
    const svg = el("svg", { class: "chart", width: o.width, height: o.height,
      viewBox: `0 0 ${o.width} ${o.height}`, role: "img", "aria-label": o.label,
      "data-points": points.length });
    const [t0, t1] = extent(points.map((p) => p.t));
    const [y0, y1] = extent(points.flatMap((p) => [p.lo, p.hi, p.mid]));
    const x = (t) => m.l + ((t - t0) / (t1 - t0)) * w;
    const y = (v) => m.t + h - ((v - y0) / (y1 - y0)) * h;
    svg.appendChild(el("line", { class: "axis", x1: m.l, y1: m.t + h, x2: m.l + w, y2: m.t + h }));
    svg.appendChild(el("line", { class: "axis", x1: m.l, y1: m.t, x2: m.l, y2: m.t + h }));
    for (const v of [y0, (y0 + y1) / 2, y1]) {
      svg.appendChild(el("text", { x: m.l - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(v)));
    }
    if (points.length) {
      svg.appendChild(el("text", { x: m.l, y: o.height - 6 }, day(points[0].t)));
      svg.appendChild(el("text", { x: m.l + w, y: o.height - 6, "text-anchor": "end" },
        day(points[points.length - 1].t)));
    }
    const banded = points.filter((p) => isFinite(p.lo) && isFinite(p.hi));
    if (banded.length) {
      const top = banded.map((p) => `${x(p.t).toFixed(1)},${y(p.hi).toFixed(1)}`);
      const bottom = banded.slice().reverse().map((p) => `${x(p.t).toFixed(1)},${y(p.lo).toFixed(1)}`);
      svg.appendChild(el("polygon", { class: "band", points: top.concat(bottom).join(" ") }));
    }
    const lined = points.filter((p) => isFinite(p.mid));
    if (lined.length) {
      const d = lined.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.mid).toFixed(1)}`);
      svg.appendChild(el("path", { class: "line", d: d.join(" ") }));
      for (const p of lined) {
        const dot = el("circle", { class: "dot", cx: x(p.t).toFixed(1), cy: y(p.mid).toFixed(1), r: 2.5 });
        dot.appendChild(el("title", {}, `${day(p.t)}: ${fmt(p.mid)}` +
          (isFinite(p.lo) ? ` (band ${fmt(p.lo)}–${fmt(p.hi)})` : "")));
        svg.appendChild(dot);
      }
    }
    return svg;
  }

  global.PearCharts = { band };
})(window);
