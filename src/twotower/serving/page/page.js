// The page of `twotower serve`. It calls the service's public HTTP API like any other client
// (POST /recommend, GET /items..., /users..., /run/curves, /metadata) and draws its charts as SVG.
// Relative URLs throughout, so the page also works behind a proxy that mounts the service on a prefix.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';
  const CACHE_MAX = 20000; // item records kept in the browser (a page of results needs tens)
  const MAX_OPTIONS = 1000; // category values in the select

  const state = {
    meta: null,
    mode: 'known',          // 'known' | 'new'
    user: null,             // raw id of the known user shown
    marks: { valid: new Set(), test: new Set() },
    heldout: null,          // {valid_total, test_total} or null when the run has no heldout file
    history: [],            // new-user mode: item records, oldest first
    selected: null,         // item record whose similar items are shown
  };
  const itemCache = new Map();

  // ---- requests ------------------------------------------------------------------------------
  // data-pending on <body> counts requests in flight and scheduled ones: 0 means the page is settled.
  let pending = 0;
  function busy(d) { pending += d; document.body.dataset.pending = String(pending); }

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function api(path, body) {
    busy(+1);
    try {
      const opts = body === undefined ? {} :
        { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
      const r = await fetch(path, opts);
      let data = null;
      try { data = await r.json(); } catch (e) { data = null; }
      if (!r.ok) throw new ApiError(r.status, (data && data.detail) || `${r.status} ${r.statusText}`);
      return data;
    } finally { busy(-1); }
  }

  // Only the answer to the latest request of a channel is drawn (a slider sends many).
  const tokens = {};
  function latest(channel) {
    const t = (tokens[channel] || 0) + 1;
    tokens[channel] = t;
    return () => tokens[channel] === t;
  }

  const timers = {};
  function schedule(channel, fn, ms = 120) {
    if (timers[channel]) clearTimeout(timers[channel]); else busy(+1);
    timers[channel] = setTimeout(() => { timers[channel] = null; fn(); busy(-1); }, ms);
  }

  function showError(e) {
    const box = $('error');
    if (!e) { box.hidden = true; box.textContent = ''; return; }
    box.hidden = false;
    box.textContent = e instanceof ApiError ? e.message : `unexpected error: ${e}`;
    if (!(e instanceof ApiError)) console.error(e);
  }

  const key = (id) => String(id);

  async function details(ids) {
    const missing = [];  // raw ids (numbers stay numbers), each once
    for (const i of ids) if (!itemCache.has(key(i)) && !missing.some((j) => key(j) === key(i))) missing.push(i);
    if (missing.length) {
      if (itemCache.size + missing.length > CACHE_MAX) itemCache.clear();
      const r = await api('items/lookup', { items: missing });
      for (const rec of r.items) itemCache.set(key(rec.item), rec);
    }
    return ids.map((i) => itemCache.get(key(i)) || { item: i, title: null, categories: {}, count: null, bucket: null });
  }

  // ---- elements ------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('data-') || k === 'title' || k === 'role') e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined && c !== false) e.append(c);
    return e;
  }

  function categoriesOf(rec) {
    const f = state.meta && state.meta.category_feature;
    return (f && rec.categories && rec.categories[f]) || [];
  }

  function itemRow(rec, opt = {}) {
    const id = key(rec.item);
    const li = el('li', {
      'data-item': id, 'data-count': rec.count === null ? '' : String(rec.count), 'data-bucket': rec.bucket || '',
      'data-categories': JSON.stringify(categoriesOf(rec)),
      title: rec.count === null ? undefined : `${rec.count} training interactions, popularity rank ${rec.rank}`,
    });
    if (state.selected && key(state.selected.item) === id) li.classList.add('selected');
    const title = el('div', { class: 'title' }, rec.title || `item ${rec.item}`,
      rec.title ? el('span', { class: 'id', text: `#${rec.item}` }) : null);
    const meta = el('div', { class: 'meta' });
    const cats = rec.categories || {};
    const chosen = $('category').value;
    for (const vals of Object.values(cats)) {
      for (const v of vals) meta.append(el('span', { class: v === chosen ? 'chip chosen' : 'chip', text: v }));
    }
    if (opt.split === 'valid') meta.append(el('span', { class: 'tag', text: 'valid', title: 'from the validation split' }));
    const right = el('div', { class: 'right' });
    if (opt.score !== undefined) right.append(el('span', { class: 'score', text: opt.score.toFixed(3), title: 'served score' }));
    if (rec.bucket) right.append(el('span', { class: `pop ${rec.bucket}`, text: `${rec.bucket} · ${rec.count}` }));
    if (opt.marks !== false && state.mode === 'known') {
      if (state.marks.test.has(id)) right.append(el('span', { class: 'mark test', text: 'test ✓', title: 'the user interacted with it in the test split' }));
      if (state.marks.valid.has(id)) right.append(el('span', { class: 'mark valid', text: 'valid ✓', title: 'the user interacted with it in the validation split' }));
    }
    let action;
    if (opt.remove) {
      action = el('button', { class: 'sim remove', type: 'button', text: '×', title: 'remove from the history' });
      action.addEventListener('click', (ev) => { ev.stopPropagation(); opt.remove(rec); });
    } else {
      action = el('button', { class: 'sim', type: 'button', text: '≈', title: 'similar items' });
      action.addEventListener('click', (ev) => { ev.stopPropagation(); showSimilar(rec); });
    }
    li.append(el('span', { class: 'rank', text: opt.rank === undefined ? '' : String(opt.rank) }),
      el('div', { class: 'body' }, title, meta), right, action);
    li.addEventListener('click', () => {
      if (opt.onClick) opt.onClick(rec);
      else if (state.mode === 'new') addToHistory(rec);
      else showSimilar(rec);
    });
    return li;
  }

  function renderList(ol, rows, emptyText) {
    ol.textContent = '';
    if (!rows.length) ol.append(el('li', { class: 'empty', text: emptyText }));
    for (const r of rows) ol.append(r);
    ol.dataset.version = String(Number(ol.dataset.version || 0) + 1);
  }

  // ---- recommendations -----------------------------------------------------------------------
  const alpha = () => Number($('alpha').value);

  function query() {
    const q = { k: Number($('k').value), alpha: alpha(), exclude_seen: $('exclude-seen').checked };
    const cat = $('category').value;
    if (cat) q.category = cat;
    if (state.mode === 'known') {
      if (state.user === null) return null;
      q.user = state.user;
    } else {
      q.history = state.history.map((r) => r.item);
      const f = featureValues();
      if (Object.keys(f).length) q.features = f;
    }
    return q;
  }

  async function refreshRecs() {
    const fresh = latest('recs');
    const q = query();
    if (!q) return;
    try {
      const r = await api('recommend', q);
      const recs = await details(r.items.map((x) => x.item));
      if (!fresh()) return;
      showError(null);
      renderRecs(recs, r);
    } catch (e) { if (fresh()) showError(e); }
  }

  function renderRecs(recs, r) {
    $('recs-title').textContent = state.mode === 'known' ? `Recommendations for user ${state.user}`
      : `Recommendations for a new user (${state.history.length} item${state.history.length === 1 ? '' : 's'})`;
    const rows = recs.map((rec, i) => itemRow(rec, { rank: i + 1, score: r.items[i].score }));
    const ol = $('recommendations');
    renderList(ol, rows, 'no items (the filter leaves none)');
    const counts = recs.map((x) => x.count).filter((c) => c !== null);
    const mean = counts.length ? counts.reduce((a, b) => a + b, 0) / counts.length : 0;
    ol.dataset.meanCount = mean.toFixed(2);
    const buckets = {};
    for (const x of recs) if (x.bucket) buckets[x.bucket] = (buckets[x.bucket] || 0) + 1;
    const parts = [`${recs.length} items`, `mean training count ${mean.toFixed(1)}`,
      ['head', 'torso', 'tail', ...Object.keys(buckets)].filter((b, i, all) => buckets[b] && all.indexOf(b) === i)
        .map((b) => `${b} ${buckets[b]}`).join(' / ')];
    if (state.mode === 'known') {
      if (state.heldout) {
        const hits = recs.filter((x) => state.marks.test.has(key(x.item))).length;
        parts.push(`${hits} of the user's ${state.heldout.test_total} test items (✓)`);
      } else {
        parts.push('no held-out marks: the run directory has no heldout.safetensors');
      }
    }
    if (r.fallback) parts.push(`the history is empty: the most popular items (${r.fallback})`);
    if (r.unknown_items && r.unknown_items.length) parts.push(`unknown items ignored: ${r.unknown_items.join(', ')}`);
    const uf = Object.entries(r.unknown_features || {});
    if (uf.length) parts.push('unknown feature values ignored: ' + uf.map(([k, v]) => `${k}=${v}`).join(', '));
    $('rec-summary').textContent = parts.filter(Boolean).join(' · ');
  }

  // ---- similar items -------------------------------------------------------------------------
  async function showSimilar(rec) {
    state.selected = rec;
    for (const li of document.querySelectorAll('ol.items li[data-item]')) {
      li.classList.toggle('selected', li.dataset.item === key(rec.item));
    }
    await refreshSimilar();
  }

  async function refreshSimilar() {
    const rec = state.selected;
    if (!rec) return;
    const fresh = latest('similar');
    const p = new URLSearchParams({ k: '10', alpha: String(alpha()) });
    const cat = $('category').value;
    if (cat) p.set('category', cat);
    try {
      const r = await api(`items/${encodeURIComponent(rec.item)}/similar?${p}`);
      const recs = await details(r.items.map((x) => x.item));
      if (!fresh()) return;
      showError(null);
      $('similar-title').textContent = `nearest to “${rec.title || 'item ' + rec.item}”` + (cat ? ` in ${cat}` : '');
      renderList($('similar'), recs.map((x, i) => itemRow(x, { rank: i + 1, score: r.items[i].score })), 'no similar items');
    } catch (e) { if (fresh()) showError(e); }
  }

  // ---- known users ---------------------------------------------------------------------------
  async function pickUser(id) {
    const fresh = latest('user');
    try {
      const u = await api(`users/${encodeURIComponent(id)}?limit=50`);
      if (!fresh()) return;
      showError(null);
      state.user = u.user;
      state.marks = { valid: new Set((u.valid || []).map(key)), test: new Set((u.test || []).map(key)) };
      state.heldout = u.test === null ? null : { valid_total: u.valid_total, test_total: u.test_total };
      for (const r of u.history) { const { split, ...rec } = r; itemCache.set(key(rec.item), rec); }
      $('user-search').value = String(u.user);
      history.replaceState(null, '', '#user=' + encodeURIComponent(u.user));
      renderUser(u);
      await refreshRecs();
    } catch (e) { if (fresh()) showError(e); }
  }

  function renderUser(u) {
    const dl = el('dl', {},
      el('dt', { text: 'user' }), el('dd', { text: String(u.user) }),
      el('dt', { text: 'interactions' }), el('dd', { text: `${u.interactions} (training + validation)` }));
    if (u.test !== null) {
      dl.append(el('dt', { text: 'went on to' }),
        el('dd', { text: `${u.valid_total} validation, ${u.test_total} test items (marked ✓ in the lists)` }));
    }
    const card = $('user-card');
    card.textContent = '';
    card.append(dl);
    $('history-note').textContent = `${u.history.length < u.interactions ? `newest ${u.history.length} of ${u.interactions}` : 'all'}, ` +
      (u.timestamps ? 'newest first' : 'the data has no timestamps: its order reversed');
    renderList($('history'), u.history.map((r, i) => itemRow(r, { rank: i + 1, split: r.split, marks: false })), 'no history');
  }

  async function randomUser() {
    try {
      const r = await api('users?random=true&limit=1');
      if (r.users.length) await pickUser(r.users[0].user);
    } catch (e) { showError(e); }
  }

  async function suggestUsers() {
    const fresh = latest('suggest');
    const q = $('user-search').value.trim();
    try {
      const r = await api(`users?${new URLSearchParams({ q, limit: '10' })}`);
      if (!fresh()) return;
      const list = $('user-suggestions');
      list.textContent = '';
      for (const u of r.users) list.append(el('option', { value: String(u.user), label: `${u.interactions} interactions` }));
    } catch (e) { if (fresh()) showError(e); }
  }

  // ---- new users -----------------------------------------------------------------------------
  function addToHistory(rec) {
    if (state.history.some((r) => key(r.item) === key(rec.item))) return;
    state.history.push(rec);
    renderNewHistory();
    schedule('recs', refreshRecs, 0);
  }

  function removeFromHistory(rec) {
    state.history = state.history.filter((r) => key(r.item) !== key(rec.item));
    renderNewHistory();
    schedule('recs', refreshRecs, 0);
  }

  function renderNewHistory() {
    renderList($('new-history'), state.history.map((r, i) => itemRow(r, { rank: i + 1, remove: removeFromHistory, marks: false,
      onClick: showSimilar })), 'empty: click items to add them');
  }

  async function searchItems() {
    const fresh = latest('items');
    const q = $('item-search').value.trim();
    try {
      const r = await api(`items?${new URLSearchParams({ q, limit: '15' })}`);
      if (!fresh()) return;
      for (const rec of r.items) itemCache.set(key(rec.item), rec);
      renderList($('item-results'), r.items.map((rec) => itemRow(rec, { marks: false, onClick: addToHistory })),
        q ? `no item contains “${q}”` : 'no items');
    } catch (e) { if (fresh()) showError(e); }
  }

  // The user-features form: one field per feature of the user tower (GET /metadata lists them).
  function renderFeatureForm() {
    const names = state.meta.user_features || [];
    const box = $('feature-fields');
    box.textContent = '';
    for (const n of names) {
      const input = el('input', { 'data-feature': n, placeholder: 'value' });
      input.addEventListener('input', () => schedule('recs', refreshRecs, 250));
      box.append(el('label', {}, n, input));
    }
    $('feature-note').textContent = names.length ? 'values of the user tower’s features (unknown values are ignored and reported)'
      : 'This model’s user tower takes no user features; a model trained with them shows a field per feature here.';
  }

  // Each value in the form its feature's kind takes (GET /metadata: features.user): a number, a
  // list of labels (a|b), a vector (numbers separated by spaces), else the text as typed.
  function featureValues() {
    const kinds = {};
    for (const f of ((state.meta.features || {}).user || [])) kinds[f.name] = f.kind;
    const out = {};
    for (const input of document.querySelectorAll('#feature-fields input')) {
      const v = input.value.trim();
      if (!v) continue;
      const kind = kinds[input.dataset.feature];
      if (kind === 'numeric' && v !== '' && !isNaN(Number(v))) out[input.dataset.feature] = Number(v);
      else if (kind === 'multi_categorical') out[input.dataset.feature] = v.split('|').map((x) => x.trim()).filter(Boolean);
      else if (kind === 'vector') out[input.dataset.feature] = v.split(/[\s,;]+/).filter(Boolean).map(Number);
      else out[input.dataset.feature] = v;
    }
    return out;
  }

  function setMode(mode) {
    state.mode = mode;
    $('mode-known').classList.toggle('active', mode === 'known');
    $('mode-new').classList.toggle('active', mode === 'new');
    $('known-pane').hidden = mode !== 'known';
    $('new-pane').hidden = mode !== 'new';
    if (mode === 'new' && !$('item-results').children.length) searchItems();
    if (mode === 'new') renderNewHistory();
    refreshRecs();
  }

  // ---- charts (SVG) --------------------------------------------------------------------------
  function svg(tag, attrs = {}, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function niceTicks(lo, hi, n = 4) {
    const span = hi - lo || Math.abs(hi) || 1;
    const raw = span / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const ticks = [];
    for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    if (ticks[ticks.length - 1] < hi) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
    return ticks;
  }

  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));

  function lineChart(box, pts, opt = {}) {
    box.textContent = '';
    pts = pts.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (!pts.length) { box.append(el('p', { class: 'empty', text: 'no per-epoch records in this run' })); return; }
    const W = 320, H = 180, m = { l: 44, r: 12, t: 10, b: 30 };
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const ticks = niceTicks(Math.min(...ys), Math.max(...ys));
    const y0 = ticks[0], y1 = ticks[ticks.length - 1];
    const X = (v) => m.l + (v - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = (v) => H - m.b - (v - y0) / ((y1 - y0) || 1) * (H - m.t - m.b);
    const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': opt.label || 'chart' });
    for (const t of ticks) {
      s.append(svg('line', { class: 'grid', x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
      s.append(svg('text', { x: m.l - 5, y: Y(t) + 3, 'text-anchor': 'end' }, fmt(t)));
    }
    const every = Math.max(1, Math.ceil((x1 - x0) / 8));
    for (let e = Math.ceil(x0); e <= x1; e += every) {
      if (e < Math.min(...xs) || e > Math.max(...xs)) continue;
      s.append(svg('text', { x: X(e), y: H - m.b + 13, 'text-anchor': 'middle' }, String(e)));
    }
    s.append(svg('line', { class: 'axis', x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
    s.append(svg('line', { class: 'axis', x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
    s.append(svg('text', { x: (m.l + W - m.r) / 2, y: H - 3, 'text-anchor': 'middle' }, 'epoch'));
    s.append(svg('path', { class: 'line', d: 'M' + pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join('L') }));
    for (const [x, y] of pts) {
      const c = svg('circle', { class: x === opt.best ? 'dot best' : 'dot', cx: X(x), cy: Y(y), r: x === opt.best ? 4 : 2.5 });
      c.append(svg('title', {}, `epoch ${x}: ${y.toPrecision(4)}`));
      s.append(c);
    }
    box.append(s);
  }

  function barChart(box, groups, series) {
    // groups: names along x; series: [{name, cls, values: {group: value|null}}]
    box.textContent = '';
    const vals = series.flatMap((s) => groups.map((g) => s.values[g])).filter((v) => v !== null && v !== undefined);
    if (!vals.length) { box.append(el('p', { class: 'empty', text: 'no popularity-bucket recall in metrics.json' })); return; }
    const W = 320, H = 180, m = { l: 44, r: 8, t: 22, b: 30 };
    const ticks = niceTicks(0, Math.max(...vals) * 1.05);
    const y1 = ticks[ticks.length - 1] || 1;
    const Y = (v) => H - m.b - v / y1 * (H - m.t - m.b);
    const gw = (W - m.l - m.r) / groups.length, bw = Math.min(26, gw * 0.8 / series.length);
    const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'recall by popularity bucket' });
    for (const t of ticks) {
      s.append(svg('line', { class: 'grid', x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
      s.append(svg('text', { x: m.l - 5, y: Y(t) + 3, 'text-anchor': 'end' }, fmt(t)));
    }
    groups.forEach((g, gi) => {
      const cx = m.l + gw * (gi + 0.5);
      s.append(svg('text', { class: 'label', x: cx, y: H - m.b + 13, 'text-anchor': 'middle' }, g));
      series.forEach((se, si) => {
        const v = se.values[g];
        if (v === null || v === undefined) return;
        const x = cx - bw * series.length / 2 + si * bw;
        const rect = svg('rect', { class: se.cls, x: x + 1, y: Y(v), width: bw - 2, height: Math.max(0.5, Y(0) - Y(v)) });
        rect.append(svg('title', {}, `${se.name} ${g}: ${v.toFixed(4)}`));
        s.append(rect);
        s.append(svg('text', { x: x + bw / 2, y: Y(v) - 3, 'text-anchor': 'middle' }, v.toFixed(2)));
      });
    });
    s.append(svg('line', { class: 'axis', x1: m.l, x2: W - m.r, y1: Y(0), y2: Y(0) }));
    const legend = svg('g', { class: 'legend' });
    series.forEach((se, si) => {
      const x = m.l + 8 + si * 70;
      legend.append(svg('rect', { class: se.cls, x, y: 4, width: 10, height: 10 }));
      legend.append(svg('text', { x: x + 14, y: 13 }, se.name));
    });
    s.append(legend);
    box.append(s);
  }

  async function loadRun() {
    try {
      const c = await api('run/curves');
      lineChart($('loss-chart'), c.epochs.map((e) => [e.epoch, e.loss]), { label: 'training loss per epoch' });
      lineChart($('metric-chart'), c.epochs.map((e) => [e.epoch, e.valid[c.monitor] ?? null]),
        { best: c.best_epoch, label: `validation ${c.monitor} per epoch` });
      $('metric-caption').textContent = `validation ${c.monitor} per epoch` + (c.best_epoch ? ` (○ best epoch, ${c.best_epoch})` : '');
      const keys = [...new Set(Object.values(c.buckets).flatMap((b) => Object.keys(b)))];
      const metric = keys.includes(c.monitor) ? c.monitor : keys[0];
      const series = [['valid', 'bar-valid'], ['test', 'bar-test']]
        .filter(([split]) => c.buckets[split] && c.buckets[split][metric])
        .map(([split, cls]) => ({ name: split, cls, values: c.buckets[split][metric] }));
      barChart($('bucket-chart'), ['all', ...c.bucket_names], series);
      if (metric) {
        const cuts = c.bucket_cuts.map((x) => Math.round(x * 100));
        $('bucket-caption').textContent = `${metric} by item popularity (head: top ${cuts[0]} % of items by training count` +
          (cuts.length > 1 ? `, torso: next ${cuts[1] - cuts[0]} %, tail: the rest)` : ', tail: the rest)');
      }
    } catch (e) { showError(e); }
  }

  function renderIndex(meta) {
    const ix = meta.index;
    const m = ix.measured || {};
    const dl = el('dl');
    const add = (k, v) => dl.append(el('dt', { text: k }), el('dd', { text: v }));
    add('kind', ix.saved === false ? `${ix.kind} (no saved index: exact search)` : ix.kind);
    const params = Object.entries(ix.params || {}).filter(([k, v]) => v !== null && k !== 'kind' &&
      ({ ivf: ['nlist', 'nprobe'], ivfpq: ['nlist', 'nprobe', 'pq_m', 'pq_bits', 'refine'],
        hnsw: ['M', 'ef_construction', 'ef_search'] }[ix.kind] || []).includes(k));
    if (params.length) add('parameters', params.map(([k, v]) => `${k} ${v}`).join(', '));
    const recalls = Object.entries(m).filter(([k, v]) => k.startsWith('recall@') && typeof v === 'number');
    if (recalls.length) add('measured recall', recalls.map(([k, v]) => `${k} ${v.toFixed(3)}`).join(', ') + ' vs exact');
    else add('recall', ix.kind === 'flat' ? '1 (exact search)' : 'not measured');
    if (typeof m.ann_ms_p50 === 'number') add('per query', `${m.ann_ms_p50.toFixed(3)} ms (exact ${m.exact_ms_p50.toFixed(3)} ms), one thread`);
    add('vectors', `${meta.counts.items.toLocaleString('en')} × ${ix.dim} dims`);
    const box = $('index-box');
    box.textContent = '';
    box.append(dl);
    const r = recalls.find(([k]) => k === 'recall@10') || recalls[0];
    $('index-info').textContent = `index ${ix.kind}` + (r ? ` · ${r[0]} ${r[1].toFixed(3)}` : ix.kind === 'flat' ? ' · exact' : '');
  }

  // ---- start ---------------------------------------------------------------------------------
  function wire() {
    $('mode-known').addEventListener('click', () => setMode('known'));
    $('mode-new').addEventListener('click', () => setMode('new'));
    $('user-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const v = $('user-search').value.trim();
      if (v) pickUser(v);
    });
    $('user-search').addEventListener('input', () => schedule('suggest', suggestUsers, 150));
    $('random-user').addEventListener('click', randomUser);
    $('item-search').addEventListener('input', () => schedule('items', searchItems, 150));
    $('clear-history').addEventListener('click', () => { state.history = []; renderNewHistory(); refreshRecs(); });
    $('alpha').addEventListener('input', () => {
      $('alpha-value').textContent = alpha().toFixed(2);
      schedule('recs', refreshRecs);
      schedule('similar', refreshSimilar);
    });
    for (const id of ['category', 'k', 'exclude-seen']) {
      $(id).addEventListener('change', () => { refreshRecs(); if (id === 'category') refreshSimilar(); });
    }
  }

  async function start() {
    wire();
    try {
      state.meta = await api('metadata');
    } catch (e) { showError(e); return; }
    const meta = state.meta;
    const mm = meta.model;
    $('run-info').textContent = `${meta.dataset.name} · ${meta.counts.users.toLocaleString('en')} users · ` +
      `${meta.counts.items.toLocaleString('en')} items · dim ${mm.dim} · τ ${Number(mm.temperature).toFixed(3)}`;
    const sel = $('category');
    if (meta.category_feature) {
      sel.previousSibling.textContent = meta.category_feature + ' ';
      // a select of a few hundred values is usable; past that the first ones, and the API for the rest
      for (const c of meta.categories.slice(0, MAX_OPTIONS)) sel.append(el('option', { value: c, text: c }));
      if (meta.categories.length > MAX_OPTIONS) {
        sel.title = `the first ${MAX_OPTIONS} of ${meta.categories.length} values; POST /recommend takes any of them`;
      }
    } else {
      sel.disabled = true;
      sel.title = 'the item tower uses no categorical feature';
    }
    renderIndex(meta);
    renderFeatureForm();
    loadRun();
    const m = /user=([^&]+)/.exec(location.hash);
    if (m) await pickUser(decodeURIComponent(m[1]));
    else await randomUser();
  }

  start();
})();
