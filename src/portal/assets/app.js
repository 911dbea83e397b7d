// iothub-emulator web portal: the little script the server-rendered pages use.
//
// - Live refresh: [data-fragment] elements are re-fetched as HTML every two seconds and swapped
//   in when they changed (keeping keyboard focus); [data-poll] elements fetch JSON and update
//   their [data-field] descendants and the twin viewer.
// - Actions ([data-action]), create forms ([data-create]), the twin editor ([data-twin]), copy
//   and show buttons, the telemetry stream ([data-telemetry]) and the direct-method form
//   ([data-method]).
//
// Every change is a call to the portal API under /portal/api/, which goes through the same hub
// code as the REST API. State-changing calls carry "X-Portal: 1" (the server's CSRF check).
'use strict';

(() => {
  const REFRESH_MS = 2000;
  const MAX_MESSAGES = 200;

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function toLogin() {
    const next = location.pathname + location.search;
    location.href = '/portal/login?next=' + encodeURIComponent(next);
  }

  // The hub's error body is {"Message":"ErrorCode:<Name>;<text>"}.
  function errorText(status, body) {
    const raw = body && typeof body.Message === 'string' ? body.Message : '';
    const m = /^ErrorCode:([^;]*);([\s\S]*)$/.exec(raw);
    if (m) return `${m[2]} (${m[1]}, HTTP ${status})`;
    return raw || `The request failed with HTTP ${status}`;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(errorText(status, body));
      this.status = status;
    }
  }

  async function api(method, url, body) {
    const headers = { Accept: 'application/json' };
    if (method !== 'GET') headers['X-Portal'] = '1';
    const init = { method, headers, credentials: 'same-origin' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401 && document.body.dataset.page !== 'signin') {
      const err = await response.json().catch(() => null);
      // Signed out (or the session expired): back to the sign-in page. A policy that lacks a
      // permission also gets 401 but is signed in; show that message instead.
      if (!err || !/does not grant/.test(err.Message || '')) {
        toLogin();
      }
      throw new ApiError(401, err);
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = text; }
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  function flash(text, isError = false) {
    const el = $('#flash');
    if (!el) return;
    el.classList.toggle('error', isError);
    el.classList.add('shown');
    el.textContent = text;
  }

  function timeText(iso) {
    if (!iso || iso.startsWith('0001-')) return 'Never';
    return iso.length >= 19 ? iso.slice(0, 19).replace('T', ' ') + ' UTC' : iso;
  }

  const capitalise = (s) => (s ? s[0].toUpperCase() + s.slice(1) : '');

  // Runs fn every ms while the page is visible; fn runs again at once when `kick` is called.
  function every(ms, fn) {
    let wake = null;
    const kick = () => wake && wake();
    (async () => {
      for (;;) {
        if (!document.hidden) {
          try { await fn(); } catch (e) { if (!(e instanceof ApiError)) console.warn(e); }
        }
        await new Promise((r) => { wake = r; setTimeout(r, ms); });
        wake = null;
      }
    })();
    document.addEventListener('visibilitychange', () => { if (!document.hidden) kick(); });
    return kick;
  }

  // ----- live fragments (tables) -----

  const fragmentKicks = [];

  function focusKey(el) {
    const row = el.closest('tr');
    return [el.tagName, el.dataset.action || '', el.getAttribute('href') || '', row ? row.dataset.id : ''].join('|');
  }

  function initFragment(el) {
    let last = null;
    const queryInput = el.dataset.fragmentQuery ? document.getElementById(el.dataset.fragmentQuery) : null;
    const url = () => {
      const q = queryInput ? queryInput.value.trim() : '';
      return el.dataset.fragment + (q ? '?q=' + encodeURIComponent(q) : '');
    };
    const refresh = async () => {
      const response = await fetch(url(), { credentials: 'same-origin', headers: { Accept: 'text/html' } });
      if (response.status === 401) { toLogin(); return; }
      if (!response.ok) return;
      const counts = response.headers.get('X-Portal-Counts');
      const html = await response.text();
      if (counts) updateCounts(counts);
      if (html === last) return;
      last = html;
      const active = document.activeElement;
      const key = active && el.contains(active) ? focusKey(active) : null;
      el.innerHTML = html;
      if (key) {
        const again = $$('a, button', el).find((c) => focusKey(c) === key);
        if (again) again.focus();
      }
    };
    const kick = every(REFRESH_MS, refresh);
    fragmentKicks.push(kick);
    if (queryInput) {
      // Filter the rows at once, then ask the hub.
      let timer = null;
      queryInput.addEventListener('input', () => {
        const q = queryInput.value.trim().toLowerCase();
        for (const row of $$('tr[data-id]', el)) {
          row.hidden = q !== '' && !row.dataset.id.toLowerCase().includes(q);
        }
        clearTimeout(timer);
        timer = setTimeout(() => {
          const u = new URL(location.href);
          if (q) u.searchParams.set('q', queryInput.value.trim()); else u.searchParams.delete('q');
          u.searchParams.delete('created');
          history.replaceState(null, '', u);
          kick();
        }, 250);
      });
      const form = queryInput.closest('form');
      if (form) form.addEventListener('submit', (e) => { e.preventDefault(); kick(); });
    }
  }

  function updateCounts(counts) {
    const el = $('[data-poll-counts]');
    const [total, enabled, disabled] = counts.split(',');
    if (el) el.textContent = `${total} device${total === '1' ? '' : 's'} · ${enabled} enabled · ${disabled} disabled`;
  }

  const refreshFragments = () => fragmentKicks.forEach((k) => k());

  // ----- live JSON (details pages) -----

  const pollKicks = [];

  function get(obj, path) {
    return path.split('.').reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function initPoll(el) {
    const kick = every(REFRESH_MS, async () => {
      let data;
      try {
        data = await api('GET', el.dataset.poll);
      } catch (e) {
        if (e.status === 404) flash('This identity no longer exists on the hub.', true);
        throw e;
      }
      for (const f of $$('[data-field]', el)) {
        const value = get(data, f.dataset.field);
        if (value === undefined) continue;
        if (f.dataset.format === 'time') {
          f.setAttribute('datetime', value || '');
          f.textContent = timeText(value);
        } else if (f.classList.contains('badge')) {
          f.dataset.value = value;
          f.textContent = capitalise(String(value));
        } else {
          f.textContent = String(value);
        }
      }
      if (data && data.twin) for (const t of $$('[data-twin]', el)) t.twinUpdate && t.twinUpdate(data.twin);
    });
    pollKicks.push(kick);
  }

  // ----- actions: enable/disable, regenerate keys, delete -----

  document.addEventListener('click', async (e) => {
    const b = e.target.closest('[data-action]');
    if (!b) return;
    const row = b.closest('tr');
    const who = row && row.dataset.id ? row.dataset.id : '';
    if (b.dataset.confirm && !window.confirm(b.dataset.confirm)) return;
    b.disabled = true;
    try {
      let message = '';
      switch (b.dataset.action) {
        case 'set-status':
          await api('PATCH', b.dataset.api, { status: b.dataset.status });
          message = `${who || 'The device'} is now ${b.dataset.status}.`;
          break;
        case 'regenerate':
          await api('POST', b.dataset.api, { regenerate: b.dataset.which });
          message = `New ${b.dataset.which === 'both' ? 'keys' : b.dataset.which + ' key'}${who ? ' for ' + who : ''}.`;
          break;
        case 'delete':
          await api('DELETE', b.dataset.api);
          message = `${who || 'It'} was deleted.`;
          break;
        default:
          return;
      }
      if (b.dataset.then) {
        location.href = b.dataset.then;
      } else if (b.hasAttribute('data-reload')) {
        location.reload();
      } else {
        flash(message);
        refreshFragments();
      }
    } catch (err) {
      flash(err.message, true);
    } finally {
      b.disabled = false;
    }
  });

  // ----- secrets: show and copy -----

  document.addEventListener('click', async (e) => {
    const show = e.target.closest('[data-show]');
    if (show) {
      const input = document.getElementById(show.dataset.show);
      const visible = input.type === 'password';
      input.type = visible ? 'text' : 'password';
      show.textContent = visible ? 'Hide' : 'Show';
      show.setAttribute('aria-pressed', String(visible));
      return;
    }
    const copy = e.target.closest('[data-copy]');
    if (!copy) return;
    const input = document.getElementById(copy.dataset.copy);
    const label = $(`label[for="${input.id}"]`);
    const name = label ? label.textContent : 'Value';
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(input.value);
      } else {
        const type = input.type;
        input.type = 'text';
        input.select();
        document.execCommand('copy');
        input.type = type;
      }
      flash(`${name} copied to the clipboard.`);
      copy.textContent = 'Copied';
      setTimeout(() => { copy.textContent = 'Copy'; }, 1500);
    } catch (err) {
      flash(`Could not copy: ${err.message}. Use Show and copy it by hand.`, true);
    }
  });

  // ----- create device / module -----

  function initCreate(form) {
    const error = $('[data-form-error]', form);
    const sync = () => {
      const auth = form.elements.authType.value;
      for (const el of $$('[data-when-auth]', form)) el.hidden = el.dataset.whenAuth !== auth;
      const manual = $('[data-when-manual]', form);
      if (manual) manual.hidden = form.elements.autoGenerate.checked;
    };
    form.addEventListener('change', sync);
    sync();
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      error.textContent = '';
      const idInput = form.elements.id;
      const id = idInput.value.trim();
      idInput.removeAttribute('aria-invalid');
      const what = form.dataset.create;
      if (!id) {
        idInput.setAttribute('aria-invalid', 'true');
        error.textContent = `Enter a ${what === 'device' ? 'device ID' : 'module identity name'}.`;
        idInput.focus();
        return;
      }
      const body = {};
      body[what === 'device' ? 'deviceId' : 'moduleId'] = id;
      if (form.elements.status) body.status = form.elements.status.value;
      if (form.elements.authType.value === 'selfSigned') {
        body.authentication = {
          type: 'selfSigned',
          x509Thumbprint: {
            primaryThumbprint: form.elements.primaryThumbprint.value.trim() || null,
            secondaryThumbprint: form.elements.secondaryThumbprint.value.trim() || null,
          },
        };
      } else {
        const manual = !form.elements.autoGenerate.checked;
        body.authentication = {
          type: 'sas',
          symmetricKey: {
            primaryKey: manual ? form.elements.primaryKey.value.trim() : '',
            secondaryKey: manual ? form.elements.secondaryKey.value.trim() : '',
          },
        };
      }
      const submit = $('button[type="submit"]', form);
      submit.disabled = true;
      try {
        await api('POST', form.dataset.api, body);
        location.href = form.dataset.then + encodeURIComponent(id);
      } catch (err) {
        error.textContent = err.message;
        if (/ id /i.test(err.message) || /already/i.test(err.message)) {
          idInput.setAttribute('aria-invalid', 'true');
          idInput.focus();
        }
      } finally {
        submit.disabled = false;
      }
    });
  }

  // ----- twin viewer and editor -----

  function editable(twin) {
    const desired = {};
    const source = (twin.properties && twin.properties.desired) || {};
    for (const [k, v] of Object.entries(source)) if (!k.startsWith('$')) desired[k] = v;
    const tags = twin.tags && typeof twin.tags === 'object' ? twin.tags : {};
    return JSON.stringify({ tags, properties: { desired } }, null, 2);
  }

  function initTwin(section) {
    const editor = $('[data-twin-editor]', section);
    const view = $('[data-twin-view]', section);
    const notice = $('[data-twin-notice]', section);
    const error = $('[data-twin-error]', section);
    const etagEl = $('[data-twin-etag]', section);
    let etag = editor.dataset.etag;
    let original = editor.value;
    let latest = null;

    const showView = (twin) => {
      const text = JSON.stringify(twin, null, 2);
      if (view.textContent !== text) view.textContent = text;
    };
    const load = (twin) => {
      editor.value = editable(twin);
      original = editor.value;
      etag = twin.etag;
      editor.dataset.etag = etag;
      etagEl.textContent = etag;
      notice.hidden = true;
      error.textContent = '';
    };

    section.twinUpdate = (twin) => {
      latest = twin;
      showView(twin);
      if (twin.etag === etag) return;
      if (editor.value === original) {
        load(twin);
      } else {
        notice.hidden = false;
        notice.textContent = `The twin changed on the hub while you were editing (etag now ${twin.etag}). Saving will be refused; use "Discard changes" to load the latest version.`;
      }
    };

    $('[data-twin-save]', section).addEventListener('click', async (e) => {
      const button = e.currentTarget;
      error.textContent = '';
      let doc;
      try {
        doc = JSON.parse(editor.value);
      } catch (err) {
        error.textContent = `Not valid JSON: ${err.message}`;
        editor.focus();
        return;
      }
      if (!doc || typeof doc !== 'object' || Array.isArray(doc)) {
        error.textContent = 'The document must be a JSON object with "tags" and "properties": {"desired": …}.';
        return;
      }
      const body = { etag };
      if ('tags' in doc) body.tags = doc.tags;
      if (doc.properties !== undefined) body.properties = doc.properties;
      button.disabled = true;
      try {
        const twin = await api('PUT', section.dataset.twin, body);
        latest = twin;
        load(twin);
        showView(twin);
        const v = twin.properties && twin.properties.desired ? twin.properties.desired.$version : '?';
        flash(`Twin saved (desired version ${v}).`);
      } catch (err) {
        error.textContent = err.status === 412
          ? `${err.message}\nThe twin changed on the hub after it was loaded. Use "Discard changes" to load the latest version, then edit again.`
          : err.message;
      } finally {
        button.disabled = false;
      }
    });

    $('[data-twin-discard]', section).addEventListener('click', async () => {
      try {
        latest = await api('GET', section.dataset.twin);
        load(latest);
        showView(latest);
      } catch (err) {
        error.textContent = err.message;
      }
    });
  }

  // ----- live telemetry -----

  function messageItem(m) {
    const li = document.createElement('li');
    const meta = document.createElement('div');
    meta.className = 'meta';
    const add = (label, value) => {
      const span = document.createElement('span');
      span.append(`${label} `);
      const strong = document.createElement('strong');
      strong.textContent = value;
      span.append(strong);
      meta.append(span);
    };
    add('Received', timeText(m.enqueuedTime));
    add('From', m.moduleId ? `${m.deviceId}/${m.moduleId}` : m.deviceId);
    if (m.source && m.source !== 'DeviceMessages') {
      const op = m.properties && m.properties.opType;
      add('Event', op ? `${m.source} (${op})` : m.source);
    }
    const routes = (m.routes || []).map((r) => (r === '$fallback' ? 'fallback route' : r));
    add('Routes', routes.length ? routes.join(', ') : 'none');
    const to = (m.endpoints || []).map((e) => e.name);
    add('To', to.length ? to.join(', ') : 'no endpoint');
    if (m.outputName) add('Output', m.outputName);
    const ct = m.systemProperties && m.systemProperties['content-type'];
    if (ct) add('Content type', ct);
    add('#', String(m.sequenceNumber));
    li.append(meta);

    const props = Object.entries(m.properties || {});
    if (props.length) {
      const dl = document.createElement('dl');
      dl.className = 'props';
      for (const [k, v] of props) {
        const dt = document.createElement('dt');
        dt.textContent = k;
        const dd = document.createElement('dd');
        dd.textContent = v === null ? '(no value)' : String(v);
        dl.append(dt, dd);
      }
      li.append(dl);
    }
    const pre = document.createElement('pre');
    pre.tabIndex = 0;
    if (m.body === null || m.body === undefined) {
      pre.textContent = `(binary, base64) ${m.bodyBase64}`;
    } else {
      try { pre.textContent = JSON.stringify(JSON.parse(m.body), null, 2); } catch { pre.textContent = m.body; }
    }
    li.append(pre);
    return li;
  }

  function initTelemetry(list) {
    const status = $('[data-live-status]');
    const pause = $('[data-live-pause]');
    let paused = false;
    let received = 0;
    let next = null;
    pause.addEventListener('click', () => {
      paused = !paused;
      pause.setAttribute('aria-pressed', String(paused));
      pause.textContent = paused ? 'Resume' : 'Pause';
      status.textContent = paused ? 'Paused: new messages wait on the hub.' : 'Listening…';
    });
    $('[data-live-clear]').addEventListener('click', () => {
      list.replaceChildren();
      received = 0;
      status.textContent = paused ? 'Paused.' : 'Cleared. Listening…';
    });
    (async () => {
      for (;;) {
        if (paused || document.hidden) { await sleep(500); continue; }
        const url = list.dataset.telemetry + (next === null ? '' : `&after=${next}&wait=20`);
        try {
          const data = await api('GET', url);
          next = data.next;
          for (const m of data.messages) {
            list.prepend(messageItem(m));
            received += 1;
          }
          while (list.children.length > MAX_MESSAGES) list.lastElementChild.remove();
          if (!paused) {
            status.textContent = received
              ? `${received} message${received === 1 ? '' : 's'}. Listening for more…`
              : 'No messages yet. Listening…';
          }
        } catch (err) {
          status.textContent = `Cannot read telemetry: ${err.message}. Retrying…`;
          await sleep(3000);
        }
      }
    })();
  }

  // ----- direct methods -----

  function initMethod(form) {
    const error = $('[data-form-error]', form);
    const result = $('[data-method-result]');
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      error.textContent = '';
      const name = form.elements.methodName.value.trim();
      if (!name) {
        error.textContent = 'Enter a method name.';
        form.elements.methodName.focus();
        return;
      }
      let payload = null;
      const raw = form.elements.payload.value.trim();
      if (raw) {
        try { payload = JSON.parse(raw); } catch (err) {
          error.textContent = `The payload is not valid JSON: ${err.message}`;
          form.elements.payload.focus();
          return;
        }
      }
      const timeout = Number(form.elements.responseTimeoutInSeconds.value || 30);
      const body = {
        methodName: name,
        payload,
        responseTimeoutInSeconds: timeout,
        connectTimeoutInSeconds: Number(form.elements.connectTimeoutInSeconds.value || 0),
      };
      const submit = $('button[type="submit"]', form);
      submit.disabled = true;
      result.replaceChildren(`Calling ${name}… (waiting up to ${timeout} s for the answer)`);
      try {
        const answer = await api('POST', form.dataset.method, body);
        const head = document.createElement('span');
        head.className = answer.status >= 200 && answer.status < 300 ? 'status-ok' : 'status-bad';
        head.textContent = `${name} answered with status ${answer.status}`;
        const pre = document.createElement('pre');
        pre.tabIndex = 0;
        pre.textContent = JSON.stringify(answer.payload, null, 2);
        result.replaceChildren(head, pre);
      } catch (err) {
        const head = document.createElement('span');
        head.className = 'status-bad';
        head.textContent = err.message;
        result.replaceChildren(head);
      } finally {
        submit.disabled = false;
      }
    });
  }

  // ----- start -----

  function start() {
    $$('[data-fragment]').forEach(initFragment);
    $$('[data-twin]').forEach(initTwin);
    $$('[data-poll]').forEach(initPoll);
    $$('form[data-create]').forEach(initCreate);
    $$('[data-telemetry]').forEach(initTelemetry);
    $$('form[data-method]').forEach(initMethod);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
