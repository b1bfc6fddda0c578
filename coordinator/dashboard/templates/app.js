// The dashboard's one script: it draws the page from /dashboard/data.json
// (the first copy is embedded in the page) and fetches it again every few
// seconds. Charts are inline SVG; nothing is downloaded from elsewhere.
"use strict";
(function () {
  var app = document.getElementById("app");
  var problem = document.getElementById("problem");
  var updated = document.getElementById("updated");
  var data = JSON.parse(document.getElementById("data").textContent);
  var smooth = false;
  try { smooth = localStorage.getItem("signal.smooth") === "1"; } catch (e) {}
  var charts = {}; // id -> {points, scale, ...} for hover

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function narrow() { return window.innerWidth < 600; }
  function short(s) { s = String(s || ""); return s.length <= 14 ? s : s.slice(0, 6) + "…" + s.slice(-6); }
  function credits(s) { return esc(s) + ' <span class="unit">credits</span>'; }
  function num(v) {
    if (v == null) return "–";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return a >= 100 ? v.toFixed(1) : v.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }
  function rate(v) { return v ? (v >= 10 ? v.toFixed(0) : v.toFixed(2)) + " steps/s" : ""; }
  function status(r) {
    return '<span class="status ' + esc(r.activity) + '"' + (r.status_reason ? ' title="' + esc(r.status_reason) + '"' : "") + ">" + esc(r.activity) + "</span>";
  }
  function runLink(r, where) {
    return '<a href="/dashboard/runs/' + encodeURIComponent(r.id) + '" data-focus="' + (where || "run") + "-link-" + esc(r.id) + '">' +
      (r.name ? esc(r.name) + " · " : "") + "<code>" + esc(r.id) + "</code></a>";
  }

  // Exponential moving average, debiased at the start as TensorBoard does.
  function ema(ys, w) {
    var out = [], acc = 0, n = 0;
    for (var i = 0; i < ys.length; i++) {
      acc = acc * w + (1 - w) * ys[i]; n++;
      out.push(acc / (1 - Math.pow(w, n)));
    }
    return out;
  }
  // ticks are about n round numbers covering [lo, hi].
  function ticks(lo, hi, n) {
    if (!(hi > lo)) { var d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    var raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
    var step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
    var t0 = Math.floor(lo / step) * step, t1 = Math.ceil(hi / step) * step, out = [];
    for (var t = t0; t <= t1 + step / 2; t += step) out.push(Math.abs(t) < step / 1e6 ? 0 : t);
    return out;
  }
  function tickLabel(t, step) {
    if (Math.abs(t) >= 1e5 || (t !== 0 && Math.abs(t) < 1e-3)) return t.toExponential(1);
    var dec = Math.max(0, -Math.floor(Math.log10(step)));
    return t.toFixed(Math.min(dec, 6));
  }

  // chart draws one figure of a run's metrics as an SVG line chart with
  // axes and ticks; hover and arrow keys read values (see bindCharts).
  function chart(id, title, metrics, key, compact) {
    var pts = [];
    metrics.forEach(function (m) { if (m[key] != null) pts.push({ x: m.step, y: m[key] }); });
    var head = "<h3>" + esc(title) + "</h3>";
    if (!pts.length) return '<div class="chart">' + head + '<p class="muted">No step has reported ' + esc(title.toLowerCase()) + " yet.</p></div>";
    // Narrow screens get a narrower drawing, so its text stays legible.
    var W = narrow() ? 330 : 480, H = compact ? 170 : 220, L = 50, R = 12, T = 10, B = 30;
    var xs = pts.map(function (p) { return p.x; }), ys = pts.map(function (p) { return p.y; });
    // The smoothing spans about a quarter of the points, at most ten.
    var sm = smooth && pts.length > 2 ? ema(ys, Math.max(0.3, Math.min(0.9, 1 - 4 / pts.length))) : null;
    var xlo = Math.min.apply(null, xs), xhi = Math.max.apply(null, xs);
    if (xhi === xlo) { xlo -= 1; xhi += 1; }
    var xt = ticks(xlo, xhi, compact || narrow() ? 4 : 6);
    var yt = ticks(Math.min.apply(null, ys), Math.max.apply(null, ys), 4);
    xt = xt.filter(function (t) { return t === Math.round(t); });
    var x0 = xt[0], x1 = xt[xt.length - 1], y0 = yt[0], y1 = yt[yt.length - 1];
    if (x1 === x0) { x1 = x0 + 1; }
    function sx(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function sy(y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); }
    var s = '<svg id="' + esc(id) + '" viewBox="0 0 ' + W + " " + H + '" class="' + (sm ? "smoothed" : "") +
      '" role="img" tabindex="0" data-focus="' + esc(id) + '" aria-label="' + esc(title) + " by step, " + pts.length +
      ' points; arrow keys read values">';
    var ystep = yt.length > 1 ? yt[1] - yt[0] : 1, xstep = xt.length > 1 ? xt[1] - xt[0] : 1;
    yt.forEach(function (t) {
      s += '<line class="grid" x1="' + L + '" x2="' + (W - R) + '" y1="' + sy(t).toFixed(1) + '" y2="' + sy(t).toFixed(1) + '"/>' +
        '<text x="' + (L - 5) + '" y="' + (sy(t) + 3).toFixed(1) + '" text-anchor="end">' + tickLabel(t, ystep) + "</text>";
    });
    xt.forEach(function (t) {
      s += '<line class="axis" x1="' + sx(t).toFixed(1) + '" x2="' + sx(t).toFixed(1) + '" y1="' + (H - B) + '" y2="' + (H - B + 4) + '"/>' +
        '<text x="' + sx(t).toFixed(1) + '" y="' + (H - B + 15) + '" text-anchor="middle">' + tickLabel(t, xstep) + "</text>";
    });
    s += '<line class="axis" x1="' + L + '" x2="' + (W - R) + '" y1="' + (H - B) + '" y2="' + (H - B) + '"/>' +
      '<line class="axis" x1="' + L + '" x2="' + L + '" y1="' + T + '" y2="' + (H - B) + '"/>' +
      '<text x="' + (W - R) + '" y="' + (H - 2) + '" text-anchor="end">step</text>';
    function line(vals, cls) {
      return '<polyline class="' + cls + '" points="' + pts.map(function (p, i) {
        return sx(p.x).toFixed(1) + "," + sy(vals[i]).toFixed(1);
      }).join(" ") + '"/>';
    }
    s += line(ys, "raw");
    if (sm) s += line(sm, "smooth");
    if (pts.length === 1) s += '<circle class="dot" r="3.5" cx="' + sx(xs[0]).toFixed(1) + '" cy="' + sy(ys[0]).toFixed(1) + '"/>';
    s += '<g class="hover" visibility="hidden"><line class="cursor" y1="' + T + '" y2="' + (H - B) + '"/><circle class="dot" r="4"/>' +
      '<rect class="tip-bg" rx="3" height="18"/><text class="tip"></text></g>';
    s += '<rect class="hit" x="' + L + '" y="' + T + '" width="' + (W - L - R) + '" height="' + (H - T - B) + '" fill="transparent"/></svg>';
    var last = pts[pts.length - 1];
    charts[id] = { pts: pts, sm: sm, sx: sx, sy: sy, W: W, T: T, bottom: H - B, title: title, idx: -1 };
    return '<div class="chart">' + head + s + '<div class="readout" aria-live="polite" id="' + esc(id) + '-readout">last: step ' + last.x + " · " +
      esc(title.toLowerCase()) + " " + num(last.y) + "</div></div>";
  }

  function showPoint(id, i) {
    var c = charts[id], svg = document.getElementById(id);
    if (!c || !svg) return;
    i = Math.max(0, Math.min(c.pts.length - 1, i));
    c.idx = i;
    var p = c.pts[i], y = c.sm ? c.sm[i] : p.y, g = svg.querySelector(".hover");
    var ln = g.querySelector("line"), dot = g.querySelector("circle");
    ln.setAttribute("x1", c.sx(p.x)); ln.setAttribute("x2", c.sx(p.x));
    dot.setAttribute("cx", c.sx(p.x)); dot.setAttribute("cy", c.sy(y));
    // A label beside the point, on the side with room, inside the plot.
    var tip = g.querySelector("text.tip"), bg = g.querySelector("rect.tip-bg");
    tip.textContent = "step " + p.x + ": " + num(c.sm ? c.sm[i] : p.y);
    g.setAttribute("visibility", "visible");
    var tw = tip.getComputedTextLength() + 10, px = c.sx(p.x), py = c.sy(y);
    var tx = px + 8 + tw > c.W - 4 ? px - 8 - tw : px + 8, ty = Math.max(c.T, Math.min(c.bottom - 18, py - 22));
    bg.setAttribute("x", tx); bg.setAttribute("y", ty); bg.setAttribute("width", tw);
    tip.setAttribute("x", tx + 5); tip.setAttribute("y", ty + 13);
    document.getElementById(id + "-readout").textContent = "step " + p.x + " · " + c.title.toLowerCase() + " " + num(p.y) +
      (c.sm ? " · smoothed " + num(c.sm[i]) : "");
  }
  function nearest(c, step) {
    var best = 0;
    for (var i = 1; i < c.pts.length; i++) if (Math.abs(c.pts[i].x - step) < Math.abs(c.pts[best].x - step)) best = i;
    return best;
  }
  function bindCharts() {
    Object.keys(charts).forEach(function (id) {
      var svg = document.getElementById(id), c = charts[id];
      if (!svg) return;
      svg.addEventListener("pointermove", function (e) {
        var r = svg.getBoundingClientRect(), vx = (e.clientX - r.left) / r.width * c.W;
        // Invert sx over the data range.
        var a = c.sx(c.pts[0].x), b = c.sx(c.pts[c.pts.length - 1].x), x0 = c.pts[0].x, x1 = c.pts[c.pts.length - 1].x;
        var step = b === a ? x0 : x0 + (vx - a) / (b - a) * (x1 - x0);
        showPoint(id, nearest(c, step));
      });
      svg.addEventListener("pointerleave", function () {
        if (document.activeElement !== svg) { c.idx = -1; svg.querySelector(".hover").setAttribute("visibility", "hidden"); }
      });
      svg.addEventListener("keydown", function (e) {
        var d = { ArrowLeft: -1, ArrowRight: 1, PageDown: -10, PageUp: 10 }[e.key];
        if (e.key === "Home") d = -c.pts.length; else if (e.key === "End") d = c.pts.length;
        if (!d) return;
        e.preventDefault();
        showPoint(id, (c.idx < 0 ? c.pts.length - 1 : c.idx) + d);
      });
      svg.addEventListener("focus", function () { showPoint(id, c.idx < 0 ? c.pts.length - 1 : c.idx); });
      svg.addEventListener("blur", function () { c.idx = -1; svg.querySelector(".hover").setAttribute("visibility", "hidden"); });
    });
  }

  function smoothToggle() {
    return '<label class="toggle"><input type="checkbox" id="smooth" data-focus="smooth"' + (smooth ? " checked" : "") + "> smooth curves</label>";
  }
  function callsTable(calls, foot) {
    if (!calls.length) return '<p class="muted">No charges yet.</p>';
    var total = 0, n = 0;
    var s = '<table class="calls"><thead><tr><th>call</th><th class="num">calls</th><th class="num">credits</th></tr></thead><tbody>';
    calls.forEach(function (c) {
      total += c.micro_credits; n += c.count;
      s += "<tr><td>" + esc(c.call) + '</td><td class="num">' + c.count + '</td><td class="num">' + esc(c.credits) + "</td></tr>";
    });
    s += "</tbody>";
    if (foot) s += '<tfoot><tr><td>total</td><td class="num">' + n + '</td><td class="num">' + (total / 1e6).toFixed(6) + "</td></tr></tfoot>";
    return s + "</table>";
  }
  function chargesTable(ch, withRun) {
    if (!ch.length) return '<p class="muted">No charges yet.</p>';
    var s = '<div class="scroll"><table id="charges"><thead><tr><th>time (UTC)</th>' + (withRun ? '<th class="hide-narrow">run</th>' : "") +
      '<th>call</th><th class="num">credits</th></tr></thead><tbody>';
    ch.forEach(function (c) {
      s += '<tr><td title="' + esc(c.time) + '">' + esc(c.clock) + "</td>" + (withRun ? '<td class="hide-narrow"><code title="' + esc(c.run_id) + '">' + esc(short(c.run_id)) + "</code></td>" : "") +
        "<td>" + esc(c.call) + '</td><td class="num">' + esc(c.credits) + "</td></tr>";
    });
    return s + "</tbody></table></div>";
  }
  function modelsSection(d) {
    var s = '<section id="models"><h2>Models and prices <span class="muted" style="font-weight:normal;font-size:12px">credits per 1K tokens; storage per GB-hour</span></h2>';
    if (!d.models.length) return s + '<p class="muted">The registry lists no model.</p></section>';
    s += '<div class="scroll"><table class="stack"><thead><tr><th>model</th><th class="num">context</th><th class="num">memory</th>' +
      '<th class="num">train</th><th class="num">prefill</th><th class="num">sample</th><th class="num">storage</th><th class="num">nodes</th></tr></thead><tbody>';
    d.models.forEach(function (m) {
      s += '<tr><td class="name">' + esc(m.name) + '</td><td class="num" data-label="context">' + m.context_length + ' tokens</td><td class="num" data-label="memory">' + esc(m.memory) +
        '</td><td class="num" data-label="train, per 1K tokens">' + esc(m.train_credits_per_1k) + '</td><td class="num" data-label="prefill, per 1K tokens">' + esc(m.prefill_credits_per_1k) +
        '</td><td class="num" data-label="sample, per 1K tokens">' + esc(m.sample_credits_per_1k) + '</td><td class="num" data-label="storage, per GB-hour">' + esc(m.storage_credits_per_gb_hour) +
        '</td><td class="num" data-label="nodes serving it">' + m.serving_nodes + "</td></tr>";
    });
    return s + "</tbody></table></div></section>";
  }
  function nodesSection(d) {
    var s = '<section><h2>Nodes</h2>';
    if (!d.nodes.length) return s + '<p class="muted">No node is advertising right now.</p></section>';
    s += '<div class="scroll"><table id="nodes" class="stack"><thead><tr><th>peer</th><th>backends</th><th>devices</th><th>models</th><th class="num">sessions</th><th>last advert</th></tr></thead><tbody>';
    d.nodes.forEach(function (n) {
      s += '<tr><td class="name"><code title="' + esc(n.peer_id) + '" data-peer="' + esc(n.peer_id) + '">' + esc(short(n.peer_id)) + '</code></td><td data-label="backends">' +
        esc((n.backends || []).join(", ")) + '</td><td data-label="devices">' + (n.devices || []).map(esc).join("<br>") + '</td><td data-label="models">' +
        esc((n.models || []).join(", ")) + '</td><td class="num" data-label="sessions">' + n.sessions + " / " + n.max_sessions + '</td><td data-label="last advert">' + esc(n.seen) + "</td></tr>";
    });
    return s + "</tbody></table></div></section>";
  }
  function accountSection(d) {
    return '<section><h2>Account <code>' + esc(d.account.account) + '</code></h2><div class="cards">' +
      '<div><div class="muted">Balance</div><div class="big" id="balance">' + credits(d.account.balance_credits) + "</div></div>" +
      '<div><div class="muted">Spent</div><div class="big">' + credits(d.account.spent_credits) + "</div></div>" +
      '<div><div class="muted">Nodes live</div><div class="big" id="nodes-live">' + d.nodes.length + "</div></div>" +
      '<div><div class="muted">Sessions open / capacity</div><div class="big">' + d.sessions + " / " + d.capacity + "</div></div></div></section>";
  }
  function runMeta(r) {
    var bits = [esc(r.base_model), "rank " + r.lora_rank, "step " + r.step];
    if (r.steps_per_second && r.activity === "training") bits.push(rate(r.steps_per_second));
    if (r.last_activity_ago) bits.push('last activity <time datetime="' + esc(r.last_activity) + '">' + esc(r.last_activity_ago) + "</time>");
    bits.push("spent " + credits(r.spent_credits));
    if (r.node) bits.push('node <code title="' + esc(r.node) + '">' + esc(short(r.node)) + "</code>");
    if (r.resumed_from_step != null) bits.push("resumed from step " + r.resumed_from_step);
    return bits.join(" · ");
  }
  function lossLine(r) {
    return r.first_loss != null ? "loss <b>" + r.first_loss.toFixed(4) + '</b> → <b class="last-loss">' + r.last_loss.toFixed(4) + "</b>" : "";
  }

  function overview(d) {
    var s = accountSection(d);
    s += '<section id="runs"><h2>Runs <span class="tools">' + smoothToggle() + "</span></h2>";
    if (!d.runs.length && !d.folded) s += '<p class="muted">No runs yet. Create one with the SDK: <code>client.create_run("signal-tiny")</code>.</p>';
    else if (!d.runs.length) s += '<p class="muted">No run has taken a step yet.</p>';
    s += '<div class="runs">';
    d.runs.forEach(function (r) {
      s += '<div class="run" id="run-' + esc(r.id) + '"><h3>' + runLink(r) + " " + status(r) + "</h3>" +
        '<div class="muted">' + runMeta(r) + "</div>" +
        chart("loss-" + r.id, "Loss", r.metrics, "loss", true) +
        "<div>" + lossLine(r) + (r.checkpoint ? '<br>checkpoint step ' + r.checkpoint.step + " (" + esc(r.checkpoint.mode) + "): <code>" + esc(r.checkpoint.uri) + "</code>" : "") + "</div></div>";
    });
    s += "</div>";
    if (d.folded && !d.all) s += '<a class="more" id="more-runs" data-focus="more-runs" href="/dashboard?all=1#runs">' + d.folded + " more run" + (d.folded > 1 ? "s" : "") + " (without steps, or older)</a>";
    if (d.all) s += '<a class="more" data-focus="fewer-runs" href="/dashboard#runs">Only runs with steps</a>' +
      (d.folded ? ' <span class="muted">(' + d.folded + " older not shown)</span>" : "");
    s += "</section>";
    var byRun = d.spend;
    s += '<section id="spend"><h2>Charges</h2><div class="grid2"><div><h3 class="muted" style="font-size:12px;margin:0">By call (the last ' + d.charges_listed + " charges)</h3>" + callsTable(d.calls, true) + "</div>" +
      '<div><h3 class="muted" style="font-size:12px;margin:0">By run (all its calls)</h3>';
    if (!byRun.length) s += '<p class="muted">No run has been charged yet.</p>';
    else {
      s += '<table id="by-run"><thead><tr><th>run</th><th class="num">credits</th></tr></thead><tbody>';
      byRun.forEach(function (r) { s += "<tr><td>" + runLink(r, "spend") + '</td><td class="num">' + esc(r.credits) + "</td></tr>"; });
      s += "</tbody></table>";
    }
    s += '</div></div><h3 class="muted" style="font-size:12px;margin:12px 0 0">Recent</h3>' + chargesTable(d.charges, true) + "</section>";
    return s + modelsSection(d) + nodesSection(d);
  }

  function runPage(d) {
    var r = d.runs[0];
    var s = '<p><a href="/dashboard" data-focus="back">← All runs</a></p>';
    s += '<section class="run-page" id="run-' + esc(r.id) + '"><h2>' + (r.name ? esc(r.name) + " · " : "") + "<code>" + esc(r.id) + "</code> " + status(r) +
      '<span class="tools">' + smoothToggle() + "</span></h2>";
    if (r.status_reason) s += '<p class="muted">' + esc(r.status_reason) + "</p>";
    s += '<div class="cards">' +
      '<div><div class="muted">Step</div><div class="big" id="step">' + r.step + "</div></div>" +
      '<div><div class="muted">Loss</div><div class="big">' + (r.last_loss != null ? '<span class="last-loss">' + r.last_loss.toFixed(4) + "</span>" : "–") + "</div>" +
      (r.first_loss != null ? '<div class="muted">from ' + r.first_loss.toFixed(4) + "</div>" : "") + "</div>" +
      '<div><div class="muted">Speed</div><div class="big" id="rate">' + (r.steps_per_second ? rate(r.steps_per_second).replace(" steps/s", ' <span class="unit">steps/s</span>') : "–") + "</div></div>" +
      '<div><div class="muted">Last activity</div><div class="big">' + (r.last_activity_ago ? '<time datetime="' + esc(r.last_activity) + '">' + esc(r.last_activity_ago) + "</time>" : "–") + "</div></div>" +
      '<div><div class="muted">Spent</div><div class="big" id="run-spent">' + credits(r.spent_credits) + "</div></div></div>";
    s += '<p class="muted">' + esc(r.base_model) + " · rank " + r.lora_rank + (r.node ? ' · node <code title="' + esc(r.node) + '">' + esc(short(r.node)) + "</code>" : "") +
      (r.resumed_from_step != null ? " · resumed from step " + r.resumed_from_step : "") + (r.created_at ? ' · created <time datetime="' + esc(r.created_at) + '">' + esc(r.created_at.replace("T", " ").slice(0, 19)) + " UTC</time>" : "") + "</p>";
    s += '<div class="charts">' + chart("loss-" + r.id, "Loss", r.metrics, "loss") + chart("lr-" + r.id, "Learning rate", r.metrics, "lr") +
      chart("gn-" + r.id, "Grad norm", r.metrics, "grad_norm") + "</div></section>";
    s += '<section id="spend"><h2>Charges</h2><div class="grid2"><div><h3 class="muted" style="font-size:12px;margin:0">By call (of the account\'s last ' + d.charges_listed + " charges)</h3>" +
      callsTable(r.calls, true) + "</div><div>" + '<h3 class="muted" style="font-size:12px;margin:0">Recent</h3>' + chargesTable(d.charges.slice(0, 10), false) + "</div></div></section>";
    s += '<section id="checkpoints"><h2>Checkpoints</h2>';
    if (!r.checkpoints || !r.checkpoints.length) s += '<p class="muted">None saved yet.</p>';
    else {
      s += '<div class="scroll"><table><thead><tr><th class="num">step</th><th>mode</th><th>uri</th></tr></thead><tbody>';
      r.checkpoints.slice().reverse().forEach(function (c) {
        s += '<tr><td class="num">' + c.step + "</td><td>" + esc(c.mode) + "</td><td><code>" + esc(c.uri) + "</code></td></tr>";
      });
      s += "</tbody></table></div>";
    }
    return s + "</section>" + modelsSection(d);
  }

  function draw(d) {
    var focused = document.activeElement && document.activeElement.getAttribute("data-focus");
    var hovered = {};
    Object.keys(charts).forEach(function (id) { if (charts[id].idx >= 0) hovered[id] = charts[id].pts[charts[id].idx].x; });
    charts = {};
    data = d;
    app.innerHTML = d.run ? runPage(d) : overview(d);
    document.title = (d.run ? (d.runs[0].name || d.runs[0].id) + " · " : "") + d.title;
    if (updated) updated.textContent = "as of " + d.now + (d.refresh_seconds > 0 ? " · updates every " + d.refresh_seconds + "s" : "");
    bindCharts();
    var box = document.getElementById("smooth");
    if (box) box.addEventListener("change", function () {
      smooth = box.checked;
      try { localStorage.setItem("signal.smooth", smooth ? "1" : "0"); } catch (e) {}
      draw(data);
    });
    if (focused) {
      var el = app.querySelector('[data-focus="' + focused.replace(/["\\]/g, "") + '"]');
      if (el) el.focus({ preventScroll: true });
    }
    Object.keys(hovered).forEach(function (id) { if (charts[id]) showPoint(id, nearest(charts[id], hovered[id])); });
  }

  var inflight = false;
  function refresh() {
    // A slow coordinator must not pile fetches up; a hidden tab waits.
    if (document.hidden || inflight) return;
    inflight = true;
    var q = data.run ? "?run=" + encodeURIComponent(data.run) : data.all ? "?all=1" : "";
    fetch("/dashboard/data.json" + q, { credentials: "same-origin", cache: "no-store" }).then(function (resp) {
      if (resp.status === 401) { location.reload(); return null; }
      return resp.json().then(function (body) {
        if (!resp.ok) throw new Error(body.error || "status " + resp.status);
        return body;
      });
    }).then(function (d) {
      if (!d) return;
      problem.hidden = true;
      draw(d);
    }).catch(function (e) {
      problem.textContent = "Could not update (" + e.message + "); retrying. The figures below are from " + data.now + ".";
      problem.hidden = false;
    }).then(function () { inflight = false; });
  }

  draw(data);
  var wasNarrow = narrow();
  window.addEventListener("resize", function () {
    if (narrow() !== wasNarrow) { wasNarrow = narrow(); draw(data); }
  });
  if (data.refresh_seconds > 0) setInterval(refresh, data.refresh_seconds * 1000);
})();
