#!/usr/bin/env node
// The benchmark's origin (the "local app" every path leads to).
//
//   node bench/origin.js PORT        (PORT 0 = any free port; prints `listening <port>` when ready)
//
// Routes, a subset of tests/e2e/fixtures/ws_echo_server.js with the same payload generator
// (tests/e2e/payload.py computes the expected SHA-256 in Python):
//   GET  /                             200 text/plain "hello from origin"
//   GET  /download?bytes=N&seed=S      payload(N, S), Content-Length set, 256 KiB writes with backpressure
//   GET  /slow?ms=M&bytes=N&seed=S     payload(N, S), Content-Length set, in equal pieces every 50 ms over
//                                      about M ms; each piece is scheduled after the previous one is
//                                      written, so a busy event loop delays pieces but never reorders them
//   POST /upload                       reads the body -> 200 JSON {bytes, sha256}
//   GET  /warm?prefix=P&count=C&bytes=N  precomputes what /slow needs for seeds P0 .. P(C-1)
//   WebSocket (any path)               text m -> `Echo: m`; binary echoed as is
// Unlike the test fixture it caches the payload base block of any number of seeds (only the part of
// it a request needs), so 1,000 concurrent slow downloads with 1,000 seeds cost the origin little.
'use strict';

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

const { BLOCK, MAX_SEEDS, baseBlock, payloadSlice } = require('../tests/e2e/fixtures/payload.js');

function intParam(q, name, dflt) {
  const v = q.get(name);
  if (v === null || v === '') {
    if (dflt === undefined) throw new Error(`missing ${name}`);
    return dflt;
  }
  if (!/^\d+$/.test(v)) throw new Error(`bad ${name}`);
  return Number(v);
}

const HELLO = Buffer.from('hello from origin');

function handle(req, res) {
  const u = new URL(req.url, 'http://origin.invalid');
  const q = u.searchParams;
  const path = u.pathname;

  if (path === '/' && req.method === 'GET') {
    res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': HELLO.length });
    res.end(HELLO);
    return;
  }

  if (path === '/download' && req.method === 'GET') {
    const n = intParam(q, 'bytes');
    const seed = q.get('seed') ?? '0';
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': n });
    let sent = 0;
    const piece = 4 * BLOCK;
    const pump = () => {
      while (sent < n) {
        const take = Math.min(piece, n - sent);
        const buf = payloadSlice(seed, sent, take);
        sent += take;
        if (!res.write(buf) && sent < n) {
          res.once('drain', pump);
          return;
        }
      }
      res.end();
    };
    pump();
    return;
  }

  if (path === '/slow' && req.method === 'GET') {
    const ms = intParam(q, 'ms');
    const n = intParam(q, 'bytes');
    const seed = q.get('seed') ?? '0';
    const steps = Math.max(1, Math.floor(ms / 50));
    const t0 = Date.now();
    let step = 0;
    let timer = null;
    res.once('close', () => clearTimeout(timer));
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': n });
    const next = () => {
      const start = Math.floor((n * step) / steps);
      const end = Math.floor((n * (step + 1)) / steps);
      if (end > start) res.write(payloadSlice(seed, start, end - start));
      step += 1;
      if (step >= steps) {
        res.end();
        return;
      }
      // aim at t0 + step * interval, so the whole body takes about `ms`
      const due = t0 + Math.round((ms * step) / Math.max(1, steps - 1));
      timer = setTimeout(next, Math.max(0, due - Date.now()));
    };
    next();
    return;
  }

  if (path === '/upload' && (req.method === 'POST' || req.method === 'PUT')) {
    const h = crypto.createHash('sha256');
    let bytes = 0;
    req.on('data', (chunk) => {
      bytes += chunk.length;
      h.update(chunk);
    });
    req.on('end', () => {
      const body = Buffer.from(JSON.stringify({ bytes, sha256: h.digest('hex') }));
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': body.length });
      res.end(body);
    });
    req.on('error', () => res.destroy());
    return;
  }

  if (path === '/warm' && req.method === 'GET') {
    // precompute the base blocks of seeds PREFIX0 .. PREFIX(count-1) up to `bytes` (for /slow runs)
    const prefix = q.get('prefix') ?? 's';
    const count = Math.min(intParam(q, 'count'), MAX_SEEDS);
    const need = Math.min(intParam(q, 'bytes'), BLOCK);
    for (let i = 0; i < count; i++) baseBlock(prefix + i, need);
    const body = Buffer.from(`warmed ${count}`);
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
    res.end(body);
    return;
  }

  res.writeHead(404, { 'Content-Type': 'text/plain', 'Content-Length': 9 });
  res.end('not found');
}

const server = http.createServer({ keepAlive: true }, (req, res) => {
  try {
    handle(req, res);
  } catch (err) {
    if (!res.headersSent) {
      const body = Buffer.from(String(err.message));
      res.writeHead(400, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
      res.end(body);
    } else {
      res.destroy();
    }
  }
});
// Benchmarks keep connections busy; don't let Node's 5 s default cut an idle pool socket mid-run.
server.keepAliveTimeout = 60000;
server.headersTimeout = 61000;

const wss = new WebSocketServer({ server, maxPayload: 256 * 1024 * 1024, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (isBinary) ws.send(data, { binary: true });
    else ws.send(`Echo: ${data.toString('utf8')}`);
  });
  ws.on('error', () => {});
});

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

const port = Number(process.argv[2] || 0);
server.listen(port, '127.0.0.1', 511, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
server.on('error', (err) => {
  process.stderr.write(`origin: ${err.message}\n`);
  process.exit(1);
});
