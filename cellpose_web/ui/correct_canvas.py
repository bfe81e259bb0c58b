"""The Correct tab's drawing surface: markup for gr.HTML and the browser script (page head).

Display and input only. The browser keeps the current plane's labels, draws masks and outlines
itself (so X/Z, zoom and pan need no server), draws each stroke as the mouse moves and sends it
once, on release, as one JSON operation through a hidden textbox + button (``#cor-op``,
``#cor-op-btn``). The server (correct_tab -> edit.MaskEditor) answers with a JSON payload in the
hidden ``#cor-payload`` textbox: the changed box of labels (zlib-compressed little-endian uint32,
base64), or the whole plane with its image. Operations are sent one at a time, in order.

Operations (all coordinates are image pixels, y then x; ``z`` is the plane):
``{"op": "outline", "z", "points": [[y, x], ...]}``, ``{"op": "brush", "z", "points", "radius",
"label"}``, ``{"op": "erase", "z", "points", "radius"}``, ``{"op": "add", "z", "y", "x"}`` (click
to add a cell from the flows), ``{"op": "delete", "labels": [...]}``, ``{"op": "merge", "z",
"labels": [a, b]}``, ``{"op": "undo"}``, ``{"op": "redo"}``, ``{"op": "plane", "z"}``.
"""
from __future__ import annotations

TOOLS = (("select", "Select"), ("outline", "Outline"), ("brush", "Brush"), ("erase", "Eraser"),
         ("add", "Click to add"))

HTML = """
<div id="cor-wrap">
  <div class="cor-bar">
    <span class="cor-tools" role="radiogroup" aria-label="Tool">
      {tools}
    </span>
    <label class="cor-lbl" title="Brush / eraser radius in image pixels">radius
      <input type="range" id="cor-radius" min="1" max="50" step="1" value="5"><span id="cor-radius-val">5</span> px</label>
  </div>
  <div class="cor-bar">
    <button type="button" class="cor-btn" data-act="zoomin" title="Zoom in (wheel, +)">+</button>
    <button type="button" class="cor-btn" data-act="zoomout" title="Zoom out (wheel, -)">&minus;</button>
    <button type="button" class="cor-btn" data-act="fit" title="Whole image (0)">Fit</button>
    <button type="button" class="cor-btn" data-act="one" title="One image pixel per screen pixel (1)">1:1</button>
    <label class="cor-lbl"><input type="checkbox" id="cor-show-masks" checked> masks (X)</label>
    <label class="cor-lbl"><input type="checkbox" id="cor-show-outlines" checked> outlines (Z)</label>
    <button type="button" class="cor-btn" data-act="undo" id="cor-undo" title="Ctrl+Z">Undo</button>
    <button type="button" class="cor-btn" data-act="redo" id="cor-redo" title="Ctrl+Y">Redo</button>
    <button type="button" class="cor-btn" data-act="delete" id="cor-delete" title="Delete key; or Ctrl+click a cell">Delete selected</button>
    <button type="button" class="cor-btn" data-act="merge" id="cor-merge" title="Select one cell, Shift+click another">Merge 2 selected</button>
    <span id="cor-plane-box" style="display:none">
      <label class="cor-lbl">plane <input type="range" id="cor-plane" min="0" max="0" step="1" value="0">
      <span id="cor-plane-val">1/1</span></label>
      <span class="cor-small">(&uarr;/&darr;, PgUp/PgDn)</span>
    </span>
  </div>
  <div id="cor-viewport"><canvas id="correct-canvas" tabindex="0" width="800" height="600"></canvas></div>
  <div id="cor-info" class="cor-small">No masks loaded.</div>
</div>
""".format(tools="\n      ".join(
    f'<label class="cor-lbl"><input type="radio" name="cor-tool" value="{v}"{" checked" if v == "outline" else ""}> '
    f'{t}</label>' for v, t in TOOLS))

CSS = """
#cor-wrap {display: flex; flex-direction: column; gap: 6px;}
#cor-wrap .cor-bar {display: flex; flex-wrap: wrap; align-items: center; gap: 4px 10px;}
#cor-wrap input[type=radio] {appearance: auto; -webkit-appearance: auto; accent-color: var(--color-accent);}
#cor-wrap .cor-lbl {display: inline-flex; align-items: center; gap: 4px; cursor: pointer;}
#cor-wrap .cor-btn {padding: 2px 10px; border: 1px solid var(--border-color-primary); border-radius: 6px;
  background: var(--button-secondary-background-fill); cursor: pointer;}
#cor-wrap .cor-small {font-size: 0.85em; color: var(--body-text-color-subdued);}
#cor-viewport {position: relative; width: 100%; height: min(66vh, 820px); background: #111; overflow: hidden;
  border-radius: 6px;}
#correct-canvas {position: absolute; left: 0; top: 0; outline: none; cursor: crosshair; touch-action: none;}
.cpw-hidden {display: none !important;}
"""

SCRIPT = r"""
<script>
(function () {
  if (window.cpwCorrect) { return; }
  var C = window.cpwCorrect = {
    W: 0, H: 0, nz: 1, z: 0, labels: null, s: 1, tx: 0, ty: 0, fitted: false, cw: 0, ch: 0, dpr: 1,
    tool: 'outline', radius: 5, showMasks: true, showOutlines: true, selected: [],
    stroke: null, drag: null, hover: null, queue: [], busy: false, busyAt: 0, outbox: null,
    lastSerial: -1, zWant: null, chain: Promise.resolve(), pal: new Uint8Array(3), srvPal: null, line: [255, 0, 0], frame: false, sent: []
  };
  function $(id) { return document.getElementById(id); }
  function canvas() { return $('correct-canvas'); }
  function visible() { var c = canvas(); return !!(c && c.offsetParent !== null); }

  // ---------------------------------------------------------------- colours (stable per label)
  // the server sends cellpose_web.render's table (d.colors) and outline colour; the formula below only
  // extends it for labels beyond the table
  function palette(n) {
    if (C.pal.length / 3 > n) { return C.pal; }
    if (C.srvPal && C.srvPal.length / 3 > n) { C.pal = C.srvPal; return C.pal; }
    var m = Math.max(n + 1, 2 * C.pal.length / 3), p = new Uint8Array(3 * m);
    p.set(C.pal);  // labels already coloured keep their colour
    for (var l = Math.max(1, C.pal.length / 3); l < m; l++) {
      var h = (l * 0.6180339887) % 1, s = 0.75, v = 1, i = Math.floor(h * 6), f = h * 6 - i;
      var a = v * (1 - s), b = v * (1 - s * f), c = v * (1 - s * (1 - f)), rgb;
      rgb = [[v, c, a], [b, v, a], [a, v, c], [a, b, v], [c, a, v], [v, a, b]][i % 6];
      p[3 * l] = rgb[0] * 255; p[3 * l + 1] = rgb[1] * 255; p[3 * l + 2] = rgb[2] * 255;
    }
    C.pal = p; return p;
  }

  // ---------------------------------------------------------------- layers (image pixels)
  function layer(w, h) { var c = document.createElement('canvas'); c.width = w; c.height = h; return c; }
  function paint(x0, y0, x1, y1) {  // recolour masks + outlines in [x0, x1) x [y0, y1) (+1 px for outlines)
    var W = C.W, H = C.H, L = C.labels;
    if (!L) { return; }
    x0 = Math.max(0, x0 - 1); y0 = Math.max(0, y0 - 1); x1 = Math.min(W, x1 + 1); y1 = Math.min(H, y1 + 1);
    if (x1 <= x0 || y1 <= y0) { return; }
    var md = C.maskImg.data, ld = C.lineImg.data, s0 = C.selected[0] || -1, s1 = C.selected[1] || -1;
    var mx = 0;
    for (var y = y0; y < y1; y++) { for (var x = x0; x < x1; x++) { var q = L[y * W + x]; if (q > mx) { mx = q; } } }
    var pal = palette(mx);
    for (y = y0; y < y1; y++) {
      var row = y * W;
      for (x = x0; x < x1; x++) {
        var i = row + x, l = L[i], p = 4 * i;
        if (l === 0) { md[p + 3] = 0; ld[p + 3] = 0; continue; }
        if (l === s0 || l === s1) { md[p] = 255; md[p + 1] = 255; md[p + 2] = 255; md[p + 3] = 170; }
        else { md[p] = pal[3 * l]; md[p + 1] = pal[3 * l + 1]; md[p + 2] = pal[3 * l + 2]; md[p + 3] = 105; }
        var edge = (x > 0 && L[i - 1] !== l) || (x < W - 1 && L[i + 1] !== l) ||
                   (y > 0 && L[i - W] !== l) || (y < H - 1 && L[i + W] !== l);
        edge = edge || x === 0 || y === 0 || x === W - 1 || y === H - 1;
        if (edge) { ld[p] = C.line[0]; ld[p + 1] = C.line[1]; ld[p + 2] = C.line[2]; ld[p + 3] = 255; } else { ld[p + 3] = 0; }
      }
    }
    C.maskCtx.putImageData(C.maskImg, 0, 0, x0, y0, x1 - x0, y1 - y0);
    C.lineCtx.putImageData(C.lineImg, 0, 0, x0, y0, x1 - x0, y1 - y0);
  }

  // ---------------------------------------------------------------- view
  function fit() {
    var c = canvas(); if (!c || !C.W) { return; }
    C.s = Math.min(C.cw / C.W, C.ch / C.H);
    C.tx = (C.cw - C.W * C.s) / 2; C.ty = (C.ch - C.H * C.s) / 2; redraw();
  }
  function zoomAt(f, cx, cy) {
    var c = canvas(); if (!c || !C.W) { return; }
    if (cx === undefined) { cx = C.cw / 2; cy = C.ch / 2; }
    var lo = Math.min(0.5, Math.min(C.cw / C.W, C.ch / C.H) / 2), s = Math.max(lo, Math.min(64, C.s * f));
    C.tx = cx - (cx - C.tx) * s / C.s; C.ty = cy - (cy - C.ty) * s / C.s; C.s = s; redraw();
  }
  function resize() {
    var c = canvas(), vp = $('cor-viewport'); if (!c || !vp) { return; }
    var w = Math.max(1, vp.clientWidth), h = Math.max(1, vp.clientHeight);
    // view maths in CSS pixels; the backing store has devicePixelRatio x as many, so HiDPI screens stay sharp
    var dpr = window.devicePixelRatio || 1;
    if (C.cw !== w || C.ch !== h || C.dpr !== dpr) {
      C.cw = w; C.ch = h; C.dpr = dpr;
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); c.style.width = w + 'px'; c.style.height = h + 'px';
      if (C.W && !C.fitted) { C.fitted = true; fit(); } redraw();
    }
  }
  function redraw() { if (!C.frame) { C.frame = true; requestAnimationFrame(draw); } }
  function draw() {
    C.frame = false;
    var c = canvas(); if (!c) { return; }
    var g = c.getContext('2d');
    g.setTransform(1, 0, 0, 1, 0, 0); g.fillStyle = '#111'; g.fillRect(0, 0, c.width, c.height);
    if (!C.W) {
      g.setTransform(C.dpr || 1, 0, 0, C.dpr || 1, 0, 0); g.fillStyle = '#aaa'; g.font = '15px sans-serif';
      g.fillText('Segment an image in the Segment tab (or load masks there); it appears here.', 16, 30); return;
    }
    g.imageSmoothingEnabled = false;
    var d = C.dpr || 1;
    g.setTransform(d * C.s, 0, 0, d * C.s, d * C.tx, d * C.ty);
    // only the part of the layers that is on screen (zoomed in on a big image this is a few pixels)
    var x0 = Math.max(0, Math.floor(-C.tx / C.s)), y0 = Math.max(0, Math.floor(-C.ty / C.s));
    var x1 = Math.min(C.W, Math.ceil((C.cw - C.tx) / C.s)), y1 = Math.min(C.H, Math.ceil((C.ch - C.ty) / C.s));
    if (x1 > x0 && y1 > y0) {
      var layers = [C.imgCv].concat(C.showMasks ? [C.maskCv] : [], C.showOutlines ? [C.lineCv] : []);
      layers.forEach(function (l) { g.drawImage(l, x0, y0, x1 - x0, y1 - y0, x0, y0, x1 - x0, y1 - y0); });
    }
    var strokes = C.sent.concat(C.stroke ? [C.stroke] : []);
    strokes.forEach(function (st) {
      if (!st.pts.length || st.z !== C.z) { return; }
      g.beginPath(); g.moveTo(st.pts[0][1] + 0.5, st.pts[0][0] + 0.5);
      for (var k = 1; k < st.pts.length; k++) { g.lineTo(st.pts[k][1] + 0.5, st.pts[k][0] + 0.5); }
      g.lineCap = 'round'; g.lineJoin = 'round';
      if (st.tool === 'outline') { g.closePath(); g.lineWidth = 2 / C.s; g.strokeStyle = '#00e5ff'; g.globalAlpha = 1; }
      else { g.lineWidth = 2 * st.radius; g.strokeStyle = st.tool === 'erase' ? '#000' : '#ffff00'; g.globalAlpha = 0.45; }
      if (st.pts.length === 1 && st.tool !== 'outline') { g.lineTo(st.pts[0][1] + 0.51, st.pts[0][0] + 0.5); }
      g.stroke(); g.globalAlpha = 1;
    });
    if (C.hover && (C.tool === 'brush' || C.tool === 'erase')) {
      g.beginPath(); g.arc(C.hover[1] + 0.5, C.hover[0] + 0.5, C.radius, 0, 2 * Math.PI);
      g.lineWidth = 1 / C.s; g.strokeStyle = C.tool === 'erase' ? '#ff5050' : '#ffff00'; g.stroke();
    }
  }
  function info(msg) {
    var el = $('cor-info'); if (!el) { return; }
    var sel = C.selected.length ? C.selected.join(', ') : 'none';
    el.textContent = (msg ? msg + ' · ' : '') + 'selected: ' + sel + ' · zoom ' + Math.round(C.s * 100) + '%' +
      (C.busy || C.queue.length ? ' · saving stroke…' : '');
  }
  function select(labels) { C.selected = labels.filter(function (l) { return l > 0; }).slice(-2); paint(0, 0, C.W, C.H); redraw(); info(); }

  // ---------------------------------------------------------------- payloads from the server
  function b64bytes(b64) {
    var bin = atob(b64), n = bin.length, u = new Uint8Array(n);
    for (var i = 0; i < n; i++) { u[i] = bin.charCodeAt(i); }
    return u;
  }
  function inflate(b64) {
    var stream = new Blob([b64bytes(b64)]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Response(stream).arrayBuffer().then(function (buf) { return new Uint32Array(buf); });
  }
  function loadImage(url) {
    return new Promise(function (ok, bad) { var im = new Image(); im.onload = function () { ok(im); }; im.onerror = bad; im.src = url; });
  }
  function putLabels(lab, crop) {
    var W = C.W;
    for (var y = 0; y < lab.h; y++) { C.labels.set(crop.subarray(y * lab.w, (y + 1) * lab.w), (lab.y0 + y) * W + lab.x0); }
    paint(lab.x0, lab.y0, lab.x0 + lab.w, lab.y0 + lab.h);
  }
  function applyNow(d) {
    var work = Promise.resolve();
    if (d.kind === 'full') {
      var same = d.W === C.W && d.H === C.H;
      if (d.colors) {
        var raw = atob(d.colors), pal = new Uint8Array(raw.length);
        for (var k = 0; k < raw.length; k++) { pal[k] = raw.charCodeAt(k); }
        C.srvPal = pal; C.pal = pal;
      }
      if (d.outline) { C.line = d.outline; }
      work = Promise.all([loadImage(d.image), inflate(d.labels.data)]).then(function (r) {
        C.W = d.W; C.H = d.H; C.nz = d.nz; C.z = d.z; if (C.zWant === d.z) { C.zWant = null; }
        if (!same || !C.imgCv) {
          C.imgCv = layer(C.W, C.H); C.maskCv = layer(C.W, C.H); C.lineCv = layer(C.W, C.H);
          C.maskCtx = C.maskCv.getContext('2d'); C.lineCtx = C.lineCv.getContext('2d');
          C.maskImg = C.maskCtx.createImageData(C.W, C.H); C.lineImg = C.lineCtx.createImageData(C.W, C.H);
          C.labels = new Uint32Array(C.W * C.H); C.fitted = false;
        }
        var g = C.imgCv.getContext('2d'); g.clearRect(0, 0, C.W, C.H); g.drawImage(r[0], 0, 0);
        C.labels.set(r[1]); paint(0, 0, C.W, C.H);
        var pl = $('cor-plane'), box = $('cor-plane-box');
        if (pl) { pl.max = String(C.nz - 1); pl.value = String(C.z); }
        if (box) { box.style.display = C.nz > 1 ? '' : 'none'; }
        if ($('cor-plane-val')) { $('cor-plane-val').textContent = (C.z + 1) + '/' + C.nz; }
        if (!C.fitted) { resize(); var c = canvas(); if (c && C.cw > 1) { C.fitted = true; fit(); } }
      });
    } else if (d.kind === 'patch') {
      work = inflate(d.labels.data).then(function (crop) { putLabels(d.labels, crop); });
    }
    return work.then(function () {
      if (d.select !== undefined && d.select !== null) { select(d.select); }
      else if (C.selected.some(function (l) { return d.gone && d.gone.indexOf(l) >= 0; })) { select([]); }
      C.sent = []; redraw(); C.message = d.message || '';
      var c = canvas(); if (c) { c.dataset.serial = String(d.serial); }
    });
  }
  C.apply = function (text) {
    var d; try { d = JSON.parse(text); } catch (e) { return; }
    if (!d || d.serial === undefined || d.serial <= C.lastSerial) { return; }
    C.lastSerial = d.serial;
    C.chain = C.chain.then(function () { return applyNow(d); }).catch(function (e) { console.error('cpwCorrect', e); })
      .then(function () { C.busy = false; info(C.message); pump(); });
  };

  // ---------------------------------------------------------------- operations to the server
  C.takeOp = function () { return JSON.stringify(C.outbox || {op: 'noop'}); };
  function send(op) { C.queue.push(op); pump(); info(); }
  function pump() {
    if (C.busy || !C.queue.length) { return; }
    var b = $('cor-op-btn'); if (!b) { return; }
    C.busy = true; C.busyAt = Date.now(); C.outbox = C.queue.shift(); b.click();
  }
  setInterval(function () { if (C.busy && Date.now() - C.busyAt > 60000) { C.busy = false; pump(); } }, 2000);
  function labelAt(p) {
    var y = Math.floor(p[0] + 0.5), x = Math.floor(p[1] + 0.5);
    if (!C.labels || y < 0 || x < 0 || y >= C.H || x >= C.W) { return 0; }
    return C.labels[y * C.W + x];
  }
  function act(a) {
    if (a === 'zoomin') { zoomAt(1.5); } else if (a === 'zoomout') { zoomAt(1 / 1.5); }
    else if (a === 'fit') { fit(); } else if (a === 'one') { zoomAt(1 / C.s); }
    else if (a === 'undo') { send({op: 'undo'}); } else if (a === 'redo') { send({op: 'redo'}); }
    else if (a === 'delete') { if (C.selected.length) { send({op: 'delete', labels: C.selected.slice()}); } else { info('select a cell first'); } }
    else if (a === 'merge') { if (C.selected.length === 2) { send({op: 'merge', z: C.z, labels: C.selected.slice()}); } else { info('select two cells (Shift+click the second)'); } }
    info();
  }
  function planeNow() { return C.zWant === null ? C.z : C.zWant; }  // the plane asked for last
  function setPlane(z) {
    z = Math.max(0, Math.min(C.nz - 1, z));
    if (z !== planeNow() && C.nz > 1) { C.zWant = z; send({op: 'plane', z: z}); }
  }

  // ---------------------------------------------------------------- mouse
  function imagePoint(ev) {
    var c = canvas(), r = c.getBoundingClientRect();
    return [(ev.clientY - r.top - C.ty) / C.s - 0.5, (ev.clientX - r.left - C.tx) / C.s - 0.5];
  }
  function down(ev) {
    if (!C.W) { return; }
    var c = canvas(); c.focus();
    ev.preventDefault();
    var p = imagePoint(ev);
    if (ev.button !== 0 || (C.tool === 'select' && !ev.ctrlKey && !ev.metaKey)) {  // pan (or a click to select)
      C.drag = {x: ev.clientX, y: ev.clientY, tx: C.tx, ty: C.ty, moved: false, p: p, shift: ev.shiftKey, button: ev.button};
      return;
    }
    if (ev.ctrlKey || ev.metaKey) {  // Ctrl+click deletes the cell under the mouse, as in Cellpose
      var l = labelAt(p); if (l) { send({op: 'delete', labels: [l]}); }
      return;
    }
    if (C.tool === 'add') { C.drag = {x: ev.clientX, y: ev.clientY, tx: C.tx, ty: C.ty, moved: false, p: p, add: true, button: 0}; return; }
    C.stroke = {tool: C.tool, radius: C.radius, z: C.z, pts: [p]};
    redraw();
  }
  function move(ev) {
    if (C.drag) {
      var dx = ev.clientX - C.drag.x, dy = ev.clientY - C.drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) { C.drag.moved = true; }
      if (C.drag.moved) { C.tx = C.drag.tx + dx; C.ty = C.drag.ty + dy; redraw(); }
      return;
    }
    if (C.stroke) {
      var p = imagePoint(ev), last = C.stroke.pts[C.stroke.pts.length - 1];
      if (Math.abs(p[0] - last[0]) + Math.abs(p[1] - last[1]) >= 0.5) { C.stroke.pts.push(p); redraw(); }
      return;
    }
    if (ev.target === canvas()) { C.hover = imagePoint(ev); if (C.tool === 'brush' || C.tool === 'erase') { redraw(); } }
  }
  function up(ev) {
    if (C.drag) {
      var d = C.drag; C.drag = null;
      if (!d.moved && d.button === 0) {
        if (d.add) { send({op: 'add', z: C.z, y: d.p[0], x: d.p[1]}); return; }
        var l = labelAt(d.p);
        if (!l) { select([]); }
        else if (d.shift) { select(C.selected.indexOf(l) >= 0 ? C.selected.filter(function (v) { return v !== l; }) : C.selected.concat([l])); }
        else { select(C.selected.length === 1 && C.selected[0] === l ? [] : [l]); }
      }
      return;
    }
    if (!C.stroke) { return; }
    var st = C.stroke; C.stroke = null;
    var pts = st.pts.map(function (q) { return [Math.round(q[0] * 100) / 100, Math.round(q[1] * 100) / 100]; });
    if (st.tool === 'outline') {
      if (pts.length < 3) { info('draw around the cell: press, move around it, release'); redraw(); return; }
      send({op: 'outline', z: st.z, points: pts});
    } else if (st.tool === 'brush') {
      send({op: 'brush', z: st.z, points: pts, radius: st.radius, label: C.selected.length ? C.selected[C.selected.length - 1] : 0});
    } else if (st.tool === 'erase') {
      send({op: 'erase', z: st.z, points: pts, radius: st.radius});
    }
    C.sent.push(st); redraw();
  }
  function wheel(ev) {
    if (!C.W) { return; }
    ev.preventDefault();
    var r = canvas().getBoundingClientRect();
    zoomAt(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top); info();
  }

  // ---------------------------------------------------------------- keys (Cellpose's where they make sense)
  function typing(t) {
    if (!t) { return false; }
    if (t.isContentEditable || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT') { return true; }
    return t.tagName === 'INPUT' && ['checkbox', 'radio', 'range', 'button'].indexOf(t.type) < 0;
  }
  function toggle(id) { var el = $(id); if (el) { el.checked = !el.checked; el.dispatchEvent(new Event('change', {bubbles: true})); } }
  function key(e) {
    if (!visible() || typing(e.target)) { return; }
    var k = e.key.toLowerCase(), ctrl = e.ctrlKey || e.metaKey, done = true;
    if (ctrl && k === 'z' && !e.shiftKey) { act('undo'); }
    else if (ctrl && (k === 'y' || (k === 'z' && e.shiftKey))) { act('redo'); }
    else if (ctrl && k === 's') { var b = $('cor-save'); if (b) { b.click(); } }
    else if (ctrl && k === 'enter') { var l = $('hitl-save'); if (l) { l.click(); } }  // Save and learn
    else if (ctrl) { done = false; }
    else if (k === 'x' || k === 'm') { toggle('cor-show-masks'); }
    else if (k === 'z' || k === 'o') { toggle('cor-show-outlines'); }
    else if (k === 'delete' || k === 'backspace') { act('delete'); }
    else if (C.nz > 1 && (k === 'pageup' || k === 'arrowup')) { setPlane(planeNow() - 1); }
    else if (C.nz > 1 && (k === 'pagedown' || k === 'arrowdown')) { setPlane(planeNow() + 1); }
    else if (k === '+' || k === '=') { act('zoomin'); } else if (k === '-') { act('zoomout'); }
    else if (k === '0') { act('fit'); } else if (k === '1') { act('one'); }
    else if (k === 'escape') { C.stroke = null; redraw(); }
    else { done = false; }
    if (done) { e.preventDefault(); e.stopPropagation(); }
  }

  // ---------------------------------------------------------------- wiring (the tab is built lazily)
  function wire() {
    var c = canvas();
    if (!c || c.dataset.wired) { return; }
    c.dataset.wired = '1';
    c.addEventListener('pointerdown', down);  // mouse, pen and touch alike
    c.addEventListener('wheel', wheel, {passive: false});
    c.addEventListener('contextmenu', function (e) { e.preventDefault(); });
    c.addEventListener('pointerleave', function () { C.hover = null; redraw(); });
    var wrap = $('cor-wrap');
    wrap.addEventListener('click', function (e) {
      var b = e.target.closest('[data-act]'); if (b) { act(b.getAttribute('data-act')); }
    });
    wrap.addEventListener('change', function (e) {
      var t = e.target;
      if (t.name === 'cor-tool') { C.tool = t.value; C.stroke = null; c.style.cursor = C.tool === 'select' ? 'default' : 'crosshair'; redraw(); }
      else if (t.id === 'cor-show-masks') { C.showMasks = t.checked; redraw(); }
      else if (t.id === 'cor-show-outlines') { C.showOutlines = t.checked; redraw(); }
      else if (t.id === 'cor-plane') { setPlane(parseInt(t.value, 10)); }
    });
    wrap.addEventListener('input', function (e) {
      if (e.target.id === 'cor-radius') { C.radius = parseFloat(e.target.value); $('cor-radius-val').textContent = e.target.value; redraw(); }
    });
    var checked = wrap.querySelector('input[name=cor-tool]:checked'); if (checked) { C.tool = checked.value; }
    new ResizeObserver(resize).observe($('cor-viewport'));
    resize(); redraw();
  }
  window.addEventListener('pointermove', move);
  window.addEventListener('pointerup', up);
  document.addEventListener('keydown', key, true);
  new MutationObserver(wire).observe(document.documentElement, {childList: true, subtree: true});
  document.addEventListener('DOMContentLoaded', wire);
})();
</script>
"""
