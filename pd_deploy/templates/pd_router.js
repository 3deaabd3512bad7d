// pd-deploy global proxy: the prefill-then-decode sequence (njs >= 0.7.0).
//
// nginx does connections, balancing, keepalive, retries and streaming; this
// script only decides what each leg receives:
//   1. prefill leg: the rewritten body goes into the js_var $pd_prefill_body and
//      r.subrequest() goes to the internal location /_pd_prefill<uri>
//      (proxy_pass + proxy_set_body, retried by nginx over distinct upstreams);
//   2. decode leg: the body goes into the js_var $pd_decode_body and the request
//      is internally redirected to @pd_decode (proxy_pass, proxy_set_body,
//      proxy_buffering off), so decode bytes stream straight to the client.
// The same X-Request-Id ($pd_request_id) goes to both legs and to the client.
//
// Options come from nginx variables set in nginx.conf (rendered by
// pd_deploy/proxy_config.py): $pd_min_prefill_chars, $pd_fallback_enabled.
// Per-request facts for the access log are written to js_var variables.
// Nothing here keeps state across requests (njs 0.7 has a VM per request).

var PREFILL_KV = {
    do_remote_decode: true,
    do_remote_prefill: false,
    remote_engine_id: null,
    remote_block_ids: null,
    remote_host: null,
    remote_port: null
};

// A token id in a pre-tokenized prompt counts as this many characters.
var CHARS_PER_TOKEN_ID = 4;

function jsonError(r, status, type, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({
        error: {message: message, type: type, param: null, code: status}
    }));
}

function textSize(v) {
    // Characters of a prompt / content value; Infinity for parts we cannot size
    // (images, audio): those always take the PD path.
    if (typeof v === 'string') {
        return v.length;
    }
    if (typeof v === 'number') {
        return CHARS_PER_TOKEN_ID;
    }
    if (Array.isArray(v)) {
        var n = 0;
        for (var i = 0; i < v.length; i++) {
            var x = v[i];
            if (x !== null && typeof x === 'object' && !Array.isArray(x)) {
                if (x.type === 'text' || typeof x.text === 'string') {
                    n += textSize(x.text);
                } else {
                    return Infinity;
                }
            } else {
                n += textSize(x);
            }
        }
        return n;
    }
    return 0;
}

function promptChars(req) {
    if (Array.isArray(req.messages)) {
        var n = 0;
        for (var i = 0; i < req.messages.length; i++) {
            var m = req.messages[i];
            if (m && typeof m === 'object') {
                n += textSize(m.content);
            }
        }
        return n;
    }
    return textSize(req.prompt);
}

function prefillBody(req) {
    var p = {};
    var keys = Object.keys(req);
    for (var i = 0; i < keys.length; i++) {
        p[keys[i]] = req[keys[i]];
    }
    p.stream = false;
    p.max_tokens = 1;
    if ('max_completion_tokens' in req) {
        p.max_completion_tokens = 1;
    }
    delete p.stream_options;
    delete p.min_tokens;
    delete p.min_completion_tokens;
    p.kv_transfer_params = PREFILL_KV;
    return JSON.stringify(p);
}

function decodeBody(raw, req, kvp) {
    // The client's own bytes plus "kv_transfer_params"; re-serialize only when
    // the client sent kv_transfer_params itself (never duplicate a key).
    if ('kv_transfer_params' in req) {
        var d = {};
        var keys = Object.keys(req);
        for (var i = 0; i < keys.length; i++) {
            d[keys[i]] = req[keys[i]];
        }
        d.kv_transfer_params = kvp;
        return JSON.stringify(d);
    }
    var end = raw.lastIndexOf('}');
    var sep = Object.keys(req).length ? ',' : '';
    return raw.substring(0, end) + sep + '"kv_transfer_params":' + JSON.stringify(kvp)
        + raw.substring(end);
}

function commas(s) {
    var n = 0;
    for (var i = 0; i < s.length; i++) {
        if (s.charCodeAt(i) === 44) {
            n++;
        }
    }
    return n;
}

function sumTimes(s) {
    // "0.001, 0.004 : 0.002" -> 0.007 ("-" entries count as 0). No regex: njs
    // would compile it again for every request.
    var t = 0;
    var start = 0;
    for (var i = 0; i <= s.length; i++) {
        var c = i < s.length ? s.charCodeAt(i) : 44;
        if (c === 44 || c === 58) {
            var v = parseFloat(s.substring(start, i));
            if (v === v) {
                t += v;
            }
            start = i + 1;
        }
    }
    return t;
}

function wantsUsage(req) {
    if (req.stream !== true) {
        return true;
    }
    var so = req.stream_options;
    return !!(so && typeof so === 'object' && so.include_usage);
}

function toDecode(r, body, mode, usage) {
    r.variables.pd_decode_body = body;
    r.variables.pd_mode = mode;
    if (usage) {
        r.variables.pd_prefill_usage = JSON.stringify(usage);
        r.internalRedirect('@pd_decode_usage');
    } else {
        r.internalRedirect('@pd_decode');
    }
}

function prefillFailed(r, raw, why) {
    if (r.variables.pd_fallback_enabled === '1') {
        r.variables.pd_fallback = 'true';
        r.log('pd: prefill failed (' + why + '), falling back to decode-only');
        toDecode(r, raw, 'fallback', null);
        return;
    }
    r.variables.pd_mode = 'error';
    var noLive = r.variables.pd_prefill_upstream === 'pd_prefill';
    jsonError(r, noLive ? 503 : 502, noLive ? 'ServiceUnavailableError' : 'BadGatewayError',
              'prefill failed: ' + why);
}

async function completions(r) {
    // Evaluate the request id in the main request before any subrequest: the
    // subrequest shares the cached value (a generated $request_id would differ).
    var rid = r.variables.pd_request_id;
    if (!rid) {
        r.variables.pd_mode = 'error';
        return jsonError(r, 500, 'InternalServerError', 'no request id');
    }
    if (r.method !== 'POST') {
        r.variables.pd_mode = 'error';
        r.headersOut['Allow'] = 'POST';
        return jsonError(r, 405, 'MethodNotAllowedError', 'use POST for ' + r.uri);
    }
    var raw = r.requestText;
    if (raw === undefined || raw === null) {
        // body in a temporary file: cannot happen while
        // client_body_buffer_size == client_max_body_size
        r.variables.pd_mode = 'error';
        return jsonError(r, 413, 'RequestTooLargeError', 'request body too large');
    }
    var req;
    try {
        req = JSON.parse(raw);
    } catch (e) {
        r.variables.pd_mode = 'error';
        return jsonError(r, 400, 'BadRequestError', 'request body is not valid JSON');
    }
    if (req === null || typeof req !== 'object' || Array.isArray(req)) {
        r.variables.pd_mode = 'error';
        return jsonError(r, 400, 'BadRequestError', 'request body must be a JSON object');
    }

    var minChars = Number(r.variables.pd_min_prefill_chars) || 0;
    if (minChars > 0 && promptChars(req) < minChars) {
        return toDecode(r, raw, 'decode_only', null);
    }

    var t0 = Date.now();
    var reply;
    try {
        // The body goes through a variable (proxy_set_body), not the
        // subrequest's body option: njs 0.7.9 does not keep that buffer valid
        // when nginx retries the subrequest on another upstream.
        r.variables.pd_prefill_body = prefillBody(req);
        reply = await r.subrequest('/_pd_prefill' + r.uri, {method: 'POST'});
    } catch (e) {
        r.variables.pd_prefill_time = String((Date.now() - t0) / 1000);
        return prefillFailed(r, raw, 'subrequest error: ' + e.message);
    }
    var addr = reply.variables.upstream_addr || '';
    r.variables.pd_prefill_upstream = addr;
    r.variables.pd_prefill_status = reply.variables.upstream_status || '';
    r.variables.pd_prefill_retries = String(addr ? commas(addr) : 0);
    var rt = reply.variables.upstream_response_time;
    r.variables.pd_prefill_time = String(rt ? sumTimes(rt).toFixed(3)
                                            : (Date.now() - t0) / 1000);

    var st = reply.status;
    if (st >= 200 && st < 300) {
        var presp = null;
        try {
            presp = JSON.parse(reply.responseText);
        } catch (e) {
            presp = null;
        }
        var kvp = presp && presp.kv_transfer_params;
        if (!kvp || typeof kvp !== 'object') {
            return prefillFailed(r, raw, 'prefill response without kv_transfer_params');
        }
        var usage = (presp.usage && typeof presp.usage === 'object' && wantsUsage(req))
            ? presp.usage : null;
        return toDecode(r, decodeBody(raw, req, kvp), 'pd', usage);
    }
    if (st >= 400 && st < 500) {
        // the client's mistake (as judged by the engine): returned as is
        r.variables.pd_mode = 'prefill_error';
        var ct = reply.headersOut['Content-Type'];
        r.headersOut['Content-Type'] = ct || 'application/json';
        r.return(st, reply.responseText || '');
        return;
    }
    prefillFailed(r, raw, 'status ' + st);
}

// ---------------------------------------------------------------- usage fix
//
// @pd_decode_usage runs these filters when the prefill reported usage and the
// client gets a usage object (non-streaming, or stream_options.include_usage).
// The prompt token count and prompt_tokens_details (cached tokens) reported to
// the client are the prefill's: a decode engine that received the KV cache
// tends to count the whole prompt as cached. SSE events are rewritten only
// when they carry "usage"; other bytes pass through unchanged, as they come.

var U = {init: false, pre: null, sse: false, carry: null, chunks: null, active: true,
         done: false};
var USAGE_KEY = '"usage"';

function usageHeaders(r) {
    U.init = true;
    U.active = r.status === 200;
    try {
        U.pre = JSON.parse(r.variables.pd_prefill_usage || 'null');
    } catch (e) {
        U.pre = null;
    }
    if (!U.pre) {
        U.active = false;
    }
    var ct = String(r.headersOut['Content-Type'] || '');
    U.sse = ct.indexOf('text/event-stream') >= 0;
    if (U.active && !U.sse) {
        // the JSON body is rewritten, its length may change
        delete r.headersOut['Content-Length'];
    }
}

function fixUsage(u) {
    var p = U.pre;
    if (!u || typeof u !== 'object' || !p) {
        return false;
    }
    var changed = false;
    if (typeof p.prompt_tokens === 'number' && u.prompt_tokens !== p.prompt_tokens) {
        u.prompt_tokens = p.prompt_tokens;
        changed = true;
    }
    var pd = p.prompt_tokens_details === undefined ? null : p.prompt_tokens_details;
    var dd = u.prompt_tokens_details === undefined ? null : u.prompt_tokens_details;
    if (JSON.stringify(pd) !== JSON.stringify(dd)) {
        u.prompt_tokens_details = pd;
        changed = true;
    }
    if (changed && typeof u.completion_tokens === 'number') {
        u.total_tokens = u.prompt_tokens + u.completion_tokens;
    }
    return changed;
}

function fixJsonText(text) {
    var obj;
    try {
        obj = JSON.parse(text);
    } catch (e) {
        return null;
    }
    if (!obj || typeof obj !== 'object' || !fixUsage(obj.usage)) {
        return null;
    }
    return JSON.stringify(obj);
}

function fixSseText(text) {
    var lines = text.split('\n');
    var changed = false;
    for (var i = 0; i < lines.length; i++) {
        var line = lines[i];
        if (line.indexOf(USAGE_KEY) < 0 || line.substring(0, 5) !== 'data:') {
            continue;
        }
        var payload = line.substring(5);
        var lead = payload.charAt(0) === ' ' ? ' ' : '';
        var fixed = fixJsonText(payload.substring(lead.length));
        if (fixed !== null) {
            lines[i] = 'data:' + lead + fixed;
            changed = true;
        }
    }
    return changed ? lines.join('\n') : null;
}

function usageBody(r, data, flags) {
    if (!U.init) {
        usageHeaders(r);
    }
    if (!data.length && !flags.last && upstreamEnded(r)) {
        // the decode stream ended early (see decodeFilter)
        U.carry = null;
        decodeLost(r, U.sse && r.status === 200, U.done, data, flags);
        return;
    }
    if (!U.active) {
        // pass-through: keep watching for the early end (no r.done())
        if (U.sse && !U.done && data.indexOf(DONE_MARK) >= 0) {
            U.done = true;
        }
        r.sendBuffer(data, flags);
        return;
    }
    if (!U.sse) {
        // one JSON document (not streamed anyway): collect, fix, send
        U.chunks = U.chunks || [];
        if (data.length) {
            U.chunks.push(data);
        }
        if (!flags.last) {
            return;
        }
        var whole = Buffer.concat(U.chunks);
        var fixed = fixJsonText(whole.toString());
        r.sendBuffer(fixed === null ? whole : fixed, flags);
        return;
    }
    // SSE: pass complete lines through at once; an incomplete last line waits
    // for the rest (an event is not usable before its end anyway).
    var buf = U.carry ? Buffer.concat([U.carry, data]) : data;
    var cut = flags.last ? buf.length : buf.lastIndexOf(10) + 1;
    // a copy: `data` may point into nginx's upstream buffer, reused by the next read
    U.carry = cut < buf.length ? Buffer.from(buf.slice(cut)) : null;
    var out = cut === buf.length ? buf : buf.slice(0, cut);
    if (!U.done && out.indexOf(DONE_MARK) >= 0) {
        U.done = true;
    }
    if (out.length && out.indexOf(USAGE_KEY) >= 0) {
        var text = fixSseText(out.toString());
        if (text !== null) {
            out = text;
        }
    }
    r.sendBuffer(out, flags);
}

// ---------------------------------------------------------------- early end of decode
//
// nginx 1.22 (proxy_buffering off): when the decode engine's connection ends before
// its response does (the engine died or closed it, or proxy_read_timeout), nginx logs
// "upstream prematurely closed connection" (or "timed out"), sends the body filters
// one empty buffer without `last` (a flush) and closes the client's connection: the
// client would see its chunked body cut short, with no end. Empty buffers without
// `last` also come mid-stream (a read that ends just after a chunk-size line), but
// then the attempt's $upstream_response_time is still "-": nginx sets it when it
// finalizes the upstream, just before that flush (or before the `last` buffer of a
// normal end). Empty + not last + time set = that event (checked on nginx 1.22.1 /
// njs 0.7.9, with real engines killed and with split reads). For an SSE
// stream the filter then sends a complete error event and "data: [DONE]" with
// `last`: the client gets a well-formed end of stream. $pd_stream_error (access log,
// pd_proxy_stream_errors_total) records it. A non-SSE body cannot be repaired (its
// head is sent): it stays cut short. The filter holds back an incomplete last line
// (an event is not usable before its end anyway) so the error event never lands
// inside a half-sent one.

var D = {init: false, sse: false, carry: null, done: false};
var DONE_MARK = 'data: [DONE]';
var LOST_EVENT = 'data: ' + JSON.stringify({error: {
    message: 'the decode engine stopped before the end of the response '
        + '(engine lost or timed out mid-stream)',
    type: 'BadGatewayError', param: null, code: 502}}) + '\n\ndata: [DONE]\n\n';

function upstreamEnded(r) {
    // the last attempt's $upstream_response_time: "-" until nginx finalizes it
    var t = r.variables.upstream_response_time || '-';
    return t.charCodeAt(t.length - 1) !== 45;
}

function decodeLost(r, sse, done, data, flags) {
    if (done) {
        // the client already has the whole stream: end it normally
        r.sendBuffer('', {last: true});
        return;
    }
    r.variables.pd_stream_error = 'decode_lost';
    if (sse) {
        r.sendBuffer(LOST_EVENT, {last: true});
    } else {
        r.sendBuffer(data, flags);
    }
}

function decodeFilter(r, data, flags) {
    if (!D.init) {
        D.init = true;
        D.sse = r.status === 200
            && String(r.headersOut['Content-Type'] || '').indexOf('text/event-stream') >= 0;
    }
    if (!data.length && !flags.last && upstreamEnded(r)) {
        D.carry = null;
        decodeLost(r, D.sse, D.done, data, flags);
        return;
    }
    if (!D.sse || D.done) {
        r.sendBuffer(data, flags);
        return;
    }
    var buf = D.carry ? Buffer.concat([D.carry, data]) : data;
    var cut = flags.last ? buf.length : buf.lastIndexOf(10) + 1;
    D.carry = cut < buf.length ? Buffer.from(buf.slice(cut)) : null;
    var out = cut === buf.length ? buf : buf.slice(0, cut);
    if (out.indexOf(DONE_MARK) >= 0) {
        D.done = true;
    }
    r.sendBuffer(out, flags);
}

export default {completions, usageHeaders, usageBody, decodeFilter};
