// The stepgate security page: a consumer pastes an API key and manages their second factors
// through the self-service API next to this file. No framework, no build step.
//
// Rules this file keeps, because the page handles credentials:
// * The API key lives in the `apiKey` variable only: never in storage, cookies, the URL or the
//   DOM (the input is emptied as soon as it is read).
// * Server strings reach the DOM through textContent or as an <img> data: URL, never as HTML.
// * No inline styles or handlers: the gateway's CSP forbids them (and the test checks).
'use strict';

(() => {
  // The API lives next to this script, so the page works under any prefix.
  const base = new URL('./', document.currentScript.src);
  const $ = (id) => document.getElementById(id);

  let apiKey = null;      // the consumer's key, in memory only
  let status = null;      // the last GET 2fa answer
  let codes = [];         // recovery codes on screen (shown once)
  let downloadUrl = null; // object URL of the recovery-code file, revoked when no longer needed
  let chosen = null;      // the request for approval being decided

  const FACTOR_NAMES = { totp: 'authenticator app', recovery_code: 'recovery code', sms: 'text message' };

  // Problem codes in words; `detail` from the server is added where these are generic.
  const WORDS = {
    api_key_missing: 'Paste your API key first.',
    api_key_invalid: 'That API key was not accepted. Check that you pasted all of it.',
    otp_required: 'This change needs a current code from a factor you already have: your ' +
      'authenticator app or a recovery code; a texted login code only when text messages ' +
      'are your only factor.',
    otp_invalid: 'That code was not accepted: it is wrong, expired or already used. ' +
      'Wait for the next code and try again.',
    too_many_attempts: 'Too many failed attempts.',
    sms_failed: 'The text message could not be sent.',
    sms_not_enrolled: 'No phone number is set up for text messages yet.',
    bad_request: 'The gateway could not use what was entered.',
    approval_unknown: 'That request for approval is gone: it expired, or it was decided.',
    forbidden: 'You may not decide this request.',
    conflict: 'This request was already decided.',
    unavailable: 'The gateway cannot check codes right now. Try again in a minute.',
  };
  const SHOW_DETAIL = new Set(['bad_request', 'sms_failed', 'forbidden']);

  class Problem extends Error {}

  function say(text, kind = 'info') {
    const m = $('message');
    m.textContent = text;
    m.dataset.kind = kind;
  }

  function retryWords(header) {
    let s = Number(header);
    if (!Number.isFinite(s) && header) s = (Date.parse(header) - Date.now()) / 1000;
    if (!Number.isFinite(s) || s <= 0) return 'Wait a while before trying again.';
    s = Math.ceil(s);
    if (s < 120) return `Try again in ${s} second${s === 1 ? '' : 's'}.`;
    return `Try again in ${Math.ceil(s / 60)} minutes.`;
  }

  function problemText(res, data) {
    const code = data && typeof data.code === 'string' ? data.code : '';
    let text = WORDS[code] || `The gateway refused the request (HTTP ${res.status}).`;
    const detail = data && typeof data.detail === 'string' ? data.detail : '';
    // The send limits share the 429 code with failed attempts; their detail tells them apart.
    if (code === 'too_many_attempts' && detail.startsWith('too many text messages')) {
      text = 'Too many text messages were asked for in a short time.';
    }
    if (res.status === 429) text += ' ' + retryWords(res.headers.get('Retry-After'));
    // A change refused for the kind of code (a texted code while an app is set up) says so.
    const changeDetail = code === 'otp_invalid' && detail.includes('for this change');
    if (detail && (!WORDS[code] || SHOW_DETAIL.has(code) || changeDetail)) text += ` (${detail})`;
    return text;
  }

  // One self-service call. Same origin, no cookies, nothing cached; the key and code travel
  // only in headers.
  async function api(method, path, { otp, body } = {}) {
    if (!apiKey) throw new Problem(WORDS.api_key_missing);
    const headers = { 'X-Api-Key': apiKey, Accept: 'application/json' };
    if (otp) headers['X-OTP'] = otp;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(new URL(path, base), {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'omit', cache: 'no-store', redirect: 'error', referrerPolicy: 'no-referrer',
      });
    } catch (_) {
      throw new Problem('The gateway could not be reached. Check your connection and try again.');
    }
    let data = null;
    if (res.status !== 204) {
      try { data = await res.json(); } catch (_) { /* not JSON: described by status below */ }
    }
    if (!res.ok) throw new Problem(problemText(res, data));
    return data;
  }

  // Runs an action from a button or form: one request at a time per control, errors in words.
  async function act(control, fn) {
    if (control.disabled) return;
    control.disabled = true;
    try {
      await fn();
    } catch (e) {
      say(e instanceof Problem ? e.message : `Something went wrong: ${e.message}`, 'error');
    } finally {
      control.disabled = false;
    }
  }

  const fmt = (s, opts) => {
    const d = new Date(s);
    return Number.isNaN(d.getTime()) ? String(s) : new Intl.DateTimeFormat(undefined, opts).format(d);
  };
  // Deadlines are whole days in the config, so they are shown in UTC, where they are exact.
  const deadline = (s) => fmt(s, { dateStyle: 'long', timeStyle: 'short', hourCycle: 'h23', timeZone: 'UTC' }) + ' UTC';
  const clock = (s) => fmt(s, { timeStyle: 'short' });

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function render(s) {
    status = s;
    const f = s.factors || {};
    const totp = f.totp || { status: 'none' };
    const sms = f.sms || { status: 'none' };
    const left = f.recovery_codes ? f.recovery_codes.remaining : 0;
    $('consumer-name').textContent = s.consumer;
    $('st-totp').textContent = {
      confirmed: `Set up (${totp.digits || 6}-digit codes, every ${totp.period || 30} seconds)`,
      pending: 'Set-up started but not confirmed',
    }[totp.status] || 'Not set up';
    $('st-sms').textContent = {
      confirmed: `Set up for ${sms.phone || 'your phone'}`,
      pending: `Waiting for the code texted to ${sms.phone || 'your phone'}`,
    }[sms.status] || (s.sms_available ? 'Not set up' : 'Not offered by this gateway');
    // Recovery codes come with the first confirmed factor: before it there are none yet.
    $('st-recovery').textContent = !s.enrolled ? 'None yet (they come with your first factor)'
      : left === 0 ? 'None left' : `${left} of 10 left`;

    const list = $('policies');
    list.replaceChildren();
    for (const p of s.policies || []) {
      const li = el('li', undefined, `policy ${p.status}`);
      li.append(el('strong', p.description || p.policy), ': ');
      // A report_only policy lets calls through whatever the standing; it only audits them.
      const trial = p.mode === 'report_only' && p.status !== 'enrolled';
      li.append(trial ? 'calls are let through for now; this policy will ask for a second factor later.' : {
        enrolled: 'you have a factor it accepts.',
        grace: p.grace_until
          ? `calls are let through until ${deadline(p.grace_until)}; after that they need a second factor.`
          : 'calls are let through for now; set up a second factor before they are not.',
        required: 'calls are refused until you set up a factor it accepts.',
      }[p.status] || p.status);
      const accepts = (p.factors || []).map((x) => FACTOR_NAMES[x] || x).join(', ');
      if (accepts) li.append(' ', el('span', `Accepts: ${accepts}.`, 'hint'));
      list.append(li);
    }
    if (!list.children.length) list.append(el('li', 'None: the routes you can call need only your key.'));

    // Changing factors needs proof once one exists; ask for a code only then.
    for (const p of document.querySelectorAll('.proof')) p.hidden = !s.enrolled;
    // What proves a change: with an authenticator app, its code (a texted one is refused,
    // the weaker factor may not change the stronger); with SMS alone, a texted code.
    const proof = totp.status === 'confirmed'
      ? 'A code from your authenticator app or a recovery code.'
      : 'A texted login code ("Text me a login code", below) or a recovery code.';
    for (const h of document.querySelectorAll('.proof-hint')) h.textContent = proof;
    if ($('totp-setup').hidden) {
      $('totp-start').textContent = totp.status === 'confirmed'
        ? 'Replace your authenticator app' : 'Set up an authenticator app';
    }
    $('recovery-regen').hidden = !s.enrolled;
    $('sms').hidden = !s.sms_available;
    $('sms-login').hidden = sms.status !== 'confirmed';
    $('sms-start').textContent = sms.status === 'confirmed'
      ? 'Change number: text me a verification code' : 'Text me a verification code';
    $('account').hidden = false;
  }

  // The requests this consumer may approve: what, by whom, and the fields their policy shows.
  function renderApprovals(list) {
    const ul = $('approval-list');
    ul.replaceChildren();
    for (const a of list) {
      const li = el('li', undefined, 'approval');
      li.dataset.id = a.id;
      li.append(el('strong', `${a.method} ${a.path}${a.query ? '?' + a.query : ''}`), ' ');
      li.append(el('span', `asked by ${a.requester}, until ${clock(a.expires_at)}`, 'hint'));
      const dl = el('dl', undefined, 'fields');
      for (const [path, value] of Object.entries(a.fields || {})) {
        dl.append(el('dt', path.replace(/^\$\./, '')), el('dd', typeof value === 'string' ? value : JSON.stringify(value)));
      }
      dl.append(el('dt', 'body'), el('dd', `${a.body_bytes} bytes`), el('dt', 'request SHA-256'), el('dd', `${a.request_sha256.slice(0, 16)}…`));
      li.append(dl);
      const pick = el('button', 'Decide', 'small');
      pick.type = 'button';
      pick.addEventListener('click', () => {
        chosen = a.id;
        $('approval-chosen').textContent = `${a.method} ${a.path}, asked by ${a.requester}.`;
        $('approval-form').hidden = false;
        $('approval-otp').focus();
      });
      li.append(pick);
      ul.append(li);
    }
    $('approvals').hidden = list.length === 0;
    if (!list.some((a) => a.id === chosen)) { chosen = null; $('approval-form').hidden = true; }
  }

  const refresh = async () => {
    render(await api('GET', '2fa'));
    renderApprovals((await api('GET', 'approvals')).approvals || []);
  };

  async function decide(verb) {
    if (!chosen) throw new Problem('Choose a request first.');
    const id = chosen;
    await api('POST', `approvals/${encodeURIComponent(id)}/${verb}`, { otp: take('approval-otp') });
    chosen = null;
    await refresh();
    say(verb === 'approve' ? 'Approved: its requester may now repeat it, once.' : 'Denied.', 'ok');
  }

  // Reads a code field and empties it: a used code is worthless, and retyping is clearer.
  function take(id) {
    const input = $(id);
    const v = input.value.trim();
    input.value = '';
    return v;
  }

  function showCodes(list) {
    codes = list.slice();
    const ol = $('recovery-codes');
    ol.replaceChildren(...codes.map((c) => { const li = el('li'); li.append(el('code', c)); return li; }));
    $('recovery').hidden = false;
    $('recovery').focus();
  }

  function clearCodes() {
    codes = [];
    $('recovery-codes').replaceChildren();
    $('recovery').hidden = true;
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = null;
  }

  function clearTotpSetup() {
    $('totp-setup').hidden = true;
    $('totp-start').classList.remove('secondary');
    $('totp-qr').removeAttribute('src');
    $('totp-secret').textContent = '';
    $('totp-uri').textContent = '';
    $('totp-code').value = '';
  }

  // The SVG becomes a data: URL for an <img>: the browser renders it as an image, so no script
  // or markup in it can reach the page (and the CSP allows img-src data:).
  function svgDataUrl(svg) {
    const bytes = new TextEncoder().encode(svg);
    let bin = '';
    for (const b of bytes) bin += String.fromCharCode(b);
    return 'data:image/svg+xml;base64,' + btoa(bin);
  }

  async function copy(text, node, what) {
    try {
      // The Clipboard API exists only in secure contexts (HTTPS or localhost).
      await navigator.clipboard.writeText(text);
      say(`${what} copied to the clipboard.`, 'ok');
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents(node);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      say(`${what} selected: press Ctrl+C (⌘C on a Mac) to copy.`);
    }
  }

  function download() {
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    const text = `stepgate recovery codes for ${status ? status.consumer : 'your key'}\n` +
      `Each code works once. Made ${new Date().toISOString()}.\n\n${codes.join('\n')}\n`;
    downloadUrl = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
    const a = el('a');
    a.href = downloadUrl;
    a.download = 'stepgate-recovery-codes.txt';
    document.body.append(a);
    a.click();
    a.remove();
    say('Recovery codes downloaded as stepgate-recovery-codes.txt.', 'ok');
  }

  // Forget everything: key, status, secrets and codes, from memory and from the DOM.
  function forget() {
    apiKey = null;
    status = null;
    clearCodes();
    clearTotpSetup();
    for (const input of document.querySelectorAll('input')) input.value = '';
    for (const id of ['consumer-name', 'st-totp', 'st-sms', 'st-recovery']) $(id).textContent = '';
    $('policies').replaceChildren();
    $('sms-confirm-form').hidden = true;
    $('account').hidden = true;
    $('signed-in').hidden = true;
    $('key-form').hidden = false;
    say('Key forgotten: nothing of it is left in this page.', 'ok');
    $('api-key').focus();
  }

  function on(id, event, handler) {
    $(id).addEventListener(event, (e) => {
      if (event === 'submit') e.preventDefault(); // forms never navigate (CSP form-action 'none')
      handler(e);
    });
  }

  on('key-form', 'submit', () => act($('load'), async () => {
    const key = take('api-key');
    if (!key) throw new Problem(WORDS.api_key_missing);
    apiKey = key;
    try {
      await refresh();
    } catch (e) {
      apiKey = null;
      $('account').hidden = true;
      throw e;
    }
    $('key-form').hidden = true;
    $('signed-in').hidden = false;
    say(`Settings loaded for ${status.consumer}.`, 'ok');
  }));

  on('forget', 'click', forget);

  on('totp-start-form', 'submit', () => act($('totp-start'), async () => {
    const r = await api('POST', '2fa/totp', { otp: take('totp-start-otp') });
    $('totp-qr').src = svgDataUrl(r.qr_svg);
    $('totp-secret').textContent = r.secret;
    $('totp-uri').textContent = r.otpauth_uri;
    $('totp-setup').hidden = false;
    $('totp-start').textContent = 'Start again with a new secret';
    $('totp-start').classList.add('secondary');
    say('Add the key to your app, then enter the code it shows.', 'ok');
    $('totp-code').focus();
    await refresh();
  }));

  on('totp-confirm-form', 'submit', () => act($('totp-confirm'), async () => {
    const r = await api('POST', '2fa/totp/confirm', { otp: take('totp-code') });
    clearTotpSetup();
    await refresh();
    showCodes(r.recovery_codes);
    // The code just typed is spent: the app's next one is the first that works.
    say(`Your authenticator app is set up. Store your recovery codes now. The code you typed is used up: your next code, in ${r.next_code_in} s, is the first that works.`, 'ok');
  }));

  on('totp-secret-copy', 'click', () => copy($('totp-secret').textContent, $('totp-secret'), 'Secret'));

  on('regen-form', 'submit', () => act($('regen'), async () => {
    const r = await api('POST', '2fa/recovery-codes', { otp: take('regen-otp') });
    await refresh();
    showCodes(r.recovery_codes);
    say('New recovery codes made; the old ones no longer work.', 'ok');
  }));

  on('recovery-copy', 'click', () => copy(codes.join('\n'), $('recovery-codes'), 'Recovery codes'));
  on('recovery-download', 'click', download);
  on('recovery-done', 'click', () => { clearCodes(); say('Recovery codes removed from the page.', 'ok'); });

  on('sms-form', 'submit', () => act($('sms-start'), async () => {
    const phone = $('sms-phone').value.trim();
    const r = await api('POST', '2fa/sms', { otp: take('sms-otp'), body: { phone } });
    $('sms-confirm-form').hidden = false;
    say(`We texted a code to ${r.phone}. It is valid until ${clock(r.expires_at)}.`, 'ok');
    $('sms-code').focus();
    await refresh();
  }));

  on('sms-confirm-form', 'submit', () => act($('sms-confirm'), async () => {
    const r = await api('POST', '2fa/sms/confirm', { otp: take('sms-code') });
    $('sms-confirm-form').hidden = true;
    $('sms-phone').value = '';
    await refresh();
    if (r.recovery_codes) showCodes(r.recovery_codes);
    say('Your phone is set up for text-message codes.' +
      (r.recovery_codes ? ' Store your recovery codes now.' : ''), 'ok');
  }));

  on('approval-form', 'submit', () => act($('approval-approve'), () => decide('approve')));
  on('approval-deny', 'click', () => act($('approval-deny'), () => decide('deny')));

  on('sms-send', 'click', () => act($('sms-send'), async () => {
    const r = await api('POST', 'sms/send');
    say(`A login code is on its way. It works once, until ${clock(r.expires_at)}.`, 'ok');
  }));

  // The page works only with this script; say so until it runs.
  $('needs-js').hidden = true;
  $('key-section').hidden = false;
})();
