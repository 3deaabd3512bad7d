// pd-deploy: repairs an engine router's SSE stream on its way to the client (router
// mode, proxy option router_stream_fix). Written for KsanaLLM's simple_router, which
// answers a streaming /v1 request with Content-Type application/octet-stream and
// appends the bytes "[DONE]\0" after the decode's own "data: [DONE]\n\n"; SSE
// clients choke on both. This filter
//   * header: turns application/octet-stream into text/event-stream (and drops any
//     Content-Length, since the body may shrink), and arms the body filter;
//   * body: passes the stream through unchanged up to and including the first
//     "data: [DONE]\n\n" (found even when it is split across chunks) and drops every
//     byte after it, plus a bare "[DONE]\0" chunk in a stream that never sent one.
//   * errors: a 5xx of the router (FastAPI's plain "Internal Server Error" when a node
//     is unreachable, {"detail": ...} when no pair is available) becomes an OpenAI
//     error object with the same status, the router's text as its message.
// Other responses (JSON answers, 4xx) pass through untouched.
// State lives in $pd_fix (js_var): "" untouched, "s:<tail>" scanning (tail: the end of
// the bytes seen so far that may start the marker), "d" done, dropping, "e:<body>"
// collecting an error body.

var MARK = 'data: [DONE]\n\n';
var TRAILER = '[DONE]\u0000';

var ERROR_TYPES = {500: 'InternalServerError', 502: 'BadGatewayError',
                   503: 'ServiceUnavailableError', 504: 'GatewayTimeoutError'};
var ERROR_KEEP = 2048;  // bytes of the router's error text kept for the message

function headers(r) {
    var ct = r.headersOut['Content-Type'] || '';
    if (r.status >= 500) {
        r.headersOut['Content-Type'] = 'application/json';
        delete r.headersOut['Content-Length'];
        r.variables.pd_fix = 'e:';
        return;
    }
    if (ct.indexOf('application/octet-stream') === 0) {
        r.headersOut['Content-Type'] = 'text/event-stream';
        delete r.headersOut['Content-Length'];
        r.variables.pd_fix = 's:';
    }
}

// the longest end of `text` that is a beginning of MARK (ASCII only)
function markPrefix(text) {
    var n = Math.min(text.length, MARK.length - 1);
    for (; n > 0; n--) {
        if (MARK.indexOf(text.slice(text.length - n)) === 0) {
            return text.slice(text.length - n);
        }
    }
    return '';
}

// the message of an OpenAI error from the router's error body
function errorMessage(text) {
    var detail = text;
    try {
        var parsed = JSON.parse(text);
        if (parsed && parsed.error && parsed.error.message) {
            return String(parsed.error.message);
        }
        if (parsed && parsed.detail !== undefined) {
            detail = typeof parsed.detail === 'string' ? parsed.detail
                : JSON.stringify(parsed.detail);
        }
    } catch (e) {
        // plain text (FastAPI's unhandled-exception body)
    }
    return 'engine router: ' + (detail.trim() || 'no detail');
}

function errorBody(r, data, flags, state) {
    // printable ASCII only: the kept text lives in a variable between calls
    var text = (state.slice(2) + data.replace(/[^\x20-\x7e\n\t]/g, '?')).slice(0, ERROR_KEEP);
    if (!flags.last) {
        r.variables.pd_fix = 'e:' + text;
        r.sendBuffer('', flags);
        return;
    }
    var status = r.status;
    var out = JSON.stringify({error: {
        message: errorMessage(text),
        type: ERROR_TYPES[status] || 'InternalServerError', param: null, code: status}});
    r.sendBuffer(out, flags);
}

function body(r, data, flags) {
    var state = r.variables.pd_fix || '';
    if (state === '') {
        r.sendBuffer(data, flags);
        return;
    }
    if (state.slice(0, 2) === 'e:') {
        errorBody(r, data, flags, state);
        return;
    }
    if (state === 'd') {
        r.sendBuffer('', flags);
        return;
    }
    if (data === TRAILER) {
        r.variables.pd_fix = 'd';
        r.sendBuffer('', flags);
        return;
    }
    var tail = state.slice(2);
    var at = (tail + data).indexOf(MARK);
    if (at >= 0) {
        r.variables.pd_fix = 'd';
        r.sendBuffer(data.slice(0, at + MARK.length - tail.length), flags);
        return;
    }
    if (flags.last && data.length >= TRAILER.length
            && data.slice(data.length - TRAILER.length) === TRAILER) {
        data = data.slice(0, data.length - TRAILER.length);
    }
    r.variables.pd_fix = 's:' + markPrefix(tail + data);
    r.sendBuffer(data, flags);
}

export default {headers, body};
