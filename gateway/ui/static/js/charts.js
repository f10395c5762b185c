// A rolling series and its line chart as inline SVG (no library, no CDN).

const SVG = "http://www.w3.org/2000/svg";

export class Series {
  constructor(windowMs = 10 * 60 * 1000) {
    this.windowMs = windowMs;
    this.points = []; // [time ms, value]
  }

  push(value, now = Date.now()) {
    if (Number.isFinite(value)) this.points.push([now, value]);
    while (this.points.length && this.points[0][0] < now - this.windowMs) this.points.shift();
  }

  get last() {
    return this.points.at(-1)?.[1];
  }
}

/** Draw `series` into the <svg> element; the label says the latest value and the scale. */
export function drawChart(svg, series, unit) {
  const width = 300;
  const height = 100;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const points = series.points;
  const max = Math.max(1e-9, ...points.map((p) => p[1]));
  const start = points.length ? points[0][0] : 0;
  const span = Math.max(1, (points.at(-1)?.[0] ?? 0) - start);
  const coords = points.map(([t, v]) => `${((t - start) / span) * width},${height - (v / max) * (height - 6) - 3}`);
  let line = svg.querySelector("polyline");
  if (!line) {
    line = document.createElementNS(SVG, "polyline");
    svg.append(line);
  }
  line.setAttribute("points", coords.join(" "));
  let dot = svg.querySelector("circle");
  if (!dot) {
    dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("r", "3");
    svg.append(dot);
  }
  const [x, y] = (coords.at(-1) || `-10,-10`).split(",");
  dot.setAttribute("cx", points.length === 1 ? String(width) : x); // the latest value, even alone
  dot.setAttribute("cy", y);
  const latest = series.last;
  const text = latest === undefined ? "no data yet" : `now ${latest.toFixed(2)} ${unit}, peak ${max.toFixed(2)}`;
  svg.setAttribute("aria-label", `${svg.dataset.title}: ${text}`);
  const caption = document.getElementById(svg.getAttribute("aria-describedby") || "");
  if (caption) caption.textContent = text;
}
