// A Node.js producer and consumer of inspectd's Redis Streams, written from spec/streams.asyncapi.yaml and
// README only (run by tests/test_wire_node.py against a running daemon).
//
// Producer: XADDs frames to <prefix>:{<line>}:frames — a PNG (made with pngjs) with a non-ASCII, oddly spaced
// `meta` and a `ts`, raw uint8 grey pixels, the same pixels as raw uint16 big-endian (`byte_order: big`) and
// little-endian (no byte_order), and three frames that must become dead letters (a decode-stage one, a
// product-stage one and a parse-stage one).
// Consumer: reads <prefix>:{<line>}:results and :dead until every frame is answered, checks each entry against
// the spec's payload schema (required fields, enums, patterns, JSON content, nothing undocumented), checks what
// must round-trip (meta byte for byte, ids, ts, the decoded mask's size and bit depth, mask_threshold), and
// writes a JSON report: what it sent, every field as it read it, each mask's decoded pixels, and `problems`.
//
// Usage: node roundtrip.mjs --redis URL --prefix P --line L --product ID --out report.json [--timeout 30]
import { createClient, RESP_TYPES } from 'redis';
import { PNG } from 'pngjs';
import yaml from 'js-yaml';
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    redis: { type: 'string', default: 'redis://127.0.0.1:6379/0' },
    prefix: { type: 'string', default: 'inspect' },
    line: { type: 'string', default: 'line-1' },
    product: { type: 'string' },
    out: { type: 'string' },
    timeout: { type: 'string', default: '30' },
  },
});
const here = path.dirname(fileURLToPath(import.meta.url));
const spec = yaml.load(readFileSync(path.join(here, '..', '..', 'spec', 'streams.asyncapi.yaml'), 'utf8'));
const schemas = spec.components.schemas;
const key = (kind) => `${args.prefix}:{${args.line}}:${kind}`;
const problems = [];
const problem = (text) => problems.push(text);

// ------------------------------------------------------------------ the frames
const W = 64;
const H = 48;
const grey = new Uint8Array(W * H);
for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) grey[y * W + x] = (x * 4 + y * 2 + (x > 40 && y > 20 ? 120 : 0)) % 256;

function pngOf(pixels) {
  const png = new PNG({ width: W, height: H, colorType: 2, inputColorType: 0, inputHasAlpha: false });
  const rgba = Buffer.alloc(W * H * 4);
  for (let i = 0; i < W * H; i++) rgba.set([pixels[i], (pixels[i] + 60) % 256, 255 - pixels[i], 255], i * 4);
  png.data = rgba;
  return PNG.sync.write(png, { colorType: 2 });
}

function uint16(pixels, bigEndian) {
  const out = Buffer.alloc(pixels.length * 2);
  pixels.forEach((v, i) => (bigEndian ? out.writeUInt16BE(v * 257, i * 2) : out.writeUInt16LE(v * 257, i * 2)));
  return out;
}

const tag = `${process.pid}-${Date.now()}`;
const meta = Buffer.from('{ "lot" : "Ä-17",\n  "note": "naïve ✓ 東京",  "n": 1.50 }', 'utf8');
const ts = '1717171717.25';
const frames = [
  { id: `png-${tag}`, expect: 'result', fields: { product: args.product, frame_id: `png-${tag}`, ts, meta, image: pngOf(grey) } },
  { id: `raw8-${tag}`, expect: 'result', fields: { product: args.product, frame_id: `raw8-${tag}`, shape: `${H},${W}`, dtype: 'uint8', image: Buffer.from(grey) } },
  { id: `raw16be-${tag}`, expect: 'result', fields: { product: args.product, frame_id: `raw16be-${tag}`, shape: `${H},${W},1`, dtype: 'uint16', byte_order: 'big', image: uint16(grey, true) } },
  { id: `raw16le-${tag}`, expect: 'result', fields: { product: args.product, frame_id: `raw16le-${tag}`, shape: `${H},${W},1`, dtype: 'uint16', image: uint16(grey, false) } },
  { id: `corrupt-${tag}`, expect: 'corrupt_image', stage: 'decode', fields: { product: args.product, frame_id: `corrupt-${tag}`, ts, meta, image: Buffer.from('not an image at all') } },
  { id: `unknown-${tag}`, expect: 'unknown_product', stage: 'product', fields: { product: `no-such-product-${tag}`, frame_id: `unknown-${tag}`, ts, meta, image: pngOf(grey) } },
  { id: `order-${tag}`, expect: 'bad_byte_order', stage: 'parse', fields: { product: args.product, frame_id: `order-${tag}`, ts, meta, shape: `${H},${W}`, dtype: 'uint16', byte_order: 'middle', image: uint16(grey, false) } },
];

const client = await createClient({ url: args.redis }).connect();
const bytes = client.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });
const sent = {};
for (const frame of frames) {
  const entryId = await client.xAdd(key('frames'), '*', frame.fields);
  sent[frame.id] = { entry_id: entryId, expect: frame.expect, stage: frame.stage ?? null, fields: Object.fromEntries(
    Object.entries(frame.fields).filter(([k]) => k !== 'image').map(([k, v]) => [k, Buffer.isBuffer(v) ? v.toString('utf8') : v])) };
}

// ------------------------------------------------------------------ the answers
const wantResults = frames.filter((f) => f.expect === 'result').length;
const wantDead = frames.length - wantResults;
const ours = (entries) => entries.filter((e) => String(e.message.frame_id ?? '').endsWith(tag));
const deadline = Date.now() + Number(args.timeout) * 1000;
let results = [];
let dead = [];
while (Date.now() < deadline) {
  results = ours(await bytes.xRange(key('results'), '-', '+'));
  dead = ours(await bytes.xRange(key('dead'), '-', '+'));
  if (results.length >= wantResults && dead.length >= wantDead) break;
  await new Promise((resolve) => setTimeout(resolve, 100));
}
await client.quit();
if (results.length !== wantResults || dead.length !== wantDead) {
  problem(`timed out: ${results.length}/${wantResults} results, ${dead.length}/${wantDead} dead letters`);
}

const BINARY = (prop) => prop.contentEncoding === 'binary';

/** The entry's fields checked against a payload schema of the spec; returns them as text (binary as base64). */
function checkAgainstSpec(schemaName, entry) {
  const schema = schemas[schemaName];
  const text = {};
  for (const [name, value] of Object.entries(entry.message)) {
    const prop = schema.properties[name];
    if (!prop) {
      problem(`${schemaName} ${entry.id}: field ${name} is not in the spec`);
      continue;
    }
    if (BINARY(prop)) {
      text[name] = value.toString('base64');
      continue;
    }
    const str = value.toString('utf8');
    if (!Buffer.from(str, 'utf8').equals(value)) problem(`${schemaName} ${entry.id}: ${name} is not UTF-8`);
    text[name] = str;
    if (prop.enum && !prop.enum.includes(str)) problem(`${schemaName} ${entry.id}: ${name}=${str} not in ${prop.enum}`);
    if (prop.pattern && !new RegExp(prop.pattern, 'u').test(str)) problem(`${schemaName} ${entry.id}: ${name}=${str} !~ ${prop.pattern}`);
    if (prop.minLength && str.length < prop.minLength) problem(`${schemaName} ${entry.id}: ${name} is empty`);
    if (prop.contentMediaType === 'application/json') {
      try {
        const parsed = JSON.parse(str);
        if (prop.contentSchema?.type === 'object' && (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))) {
          problem(`${schemaName} ${entry.id}: ${name} is not a JSON object`);
        }
      } catch (err) {
        problem(`${schemaName} ${entry.id}: ${name} is not JSON (${err.message})`);
      }
    }
  }
  for (const name of schema.required) {
    if (!(name in entry.message)) problem(`${schemaName} ${entry.id}: required field ${name} is missing`);
  }
  return text;
}

const byFrame = Object.fromEntries(frames.map((f) => [f.id, f]));
const reportResults = results.map((entry) => {
  const fields = checkAgainstSpec('ResultFields', entry);
  const frame = byFrame[fields.frame_id];
  const mine = sent[fields.frame_id];
  if (!frame) return { fields, problem: 'unknown frame' };
  if (fields.entry_id !== mine.entry_id) problem(`${frame.id}: entry_id ${fields.entry_id} != XADD's ${mine.entry_id}`);
  if (fields.product !== args.product || fields.line !== args.line) problem(`${frame.id}: product/line changed`);
  const sentMeta = frame.fields.meta ?? Buffer.from('{}');
  if (!entry.message.meta.equals(sentMeta)) problem(`${frame.id}: meta ${JSON.stringify(fields.meta)} is not byte for byte ${JSON.stringify(sentMeta.toString())}`);
  const expectedTs = frame.fields.ts ? Number(frame.fields.ts) : Number(mine.entry_id.split('-')[0]) / 1000;
  if (Number(fields.ts) !== expectedTs) problem(`${frame.id}: ts ${fields.ts} != ${expectedTs}`);
  const [score, threshold, scale] = [Number(fields.score), Number(fields.threshold), Number(fields.mask_scale)];
  if ((score >= threshold ? 'NG' : 'OK') !== fields.verdict) problem(`${frame.id}: verdict ${fields.verdict} vs score ${score} / threshold ${threshold}`);
  const bits = Number(fields.mask_bits);
  const full = 2 ** bits - 1;
  const wantThreshold = (threshold / scale) * full;
  if (Math.abs(Number(fields.mask_threshold) - wantThreshold) > 1e-9 * Math.max(1, wantThreshold)) {
    problem(`${frame.id}: mask_threshold ${fields.mask_threshold} != threshold / mask_scale * ${full}`);
  }
  const timings = JSON.parse(fields.timings);
  for (const stage of ['queue_wait', 'decode', 'preprocess', 'forward', 'score']) {
    if (typeof timings[stage] !== 'number' || timings[stage] < 0) problem(`${frame.id}: timings.${stage} missing`);
  }
  let mask = null;
  if (entry.message.mask) {
    const png = PNG.sync.read(entry.message.mask, { skipRescale: true });
    const pixels = Array.from(png.data).filter((_, i) => i % 4 === 0);
    mask = { width: png.width, height: png.height, depth: png.depth, colorType: png.colorType, pixels };
    if (png.depth !== bits) problem(`${frame.id}: mask is ${png.depth}-bit, mask_bits says ${bits}`);
    if (png.colorType !== 0) problem(`${frame.id}: mask colour type ${png.colorType}, expected 0 (greyscale)`);
    if (png.width !== W || png.height !== H) problem(`${frame.id}: mask ${png.width}x${png.height}, frame ${W}x${H}`);
    if (Math.max(...pixels) > full) problem(`${frame.id}: mask pixel above ${full}`);
  } else {
    problem(`${frame.id}: no mask (${fields.mask_note})`);
  }
  return { frame: frame.id, fields, mask };
});

const reportDead = dead.map((entry) => {
  const fields = checkAgainstSpec('DeadLetterFields', entry);
  const frame = byFrame[fields.frame_id];
  if (!frame) return { fields, problem: 'unknown frame' };
  if (fields.reason !== frame.expect || fields.stage !== frame.stage) {
    problem(`${frame.id}: dead letter ${fields.stage}/${fields.reason}, expected ${frame.stage}/${frame.expect}`);
  }
  if (fields.entry_id !== sent[frame.id].entry_id) problem(`${frame.id}: dead letter entry_id differs`);
  const original = JSON.parse(fields.fields);
  for (const name of ['product', 'frame_id', 'ts', 'meta']) {
    const want = Buffer.isBuffer(frame.fields[name]) ? frame.fields[name].toString('utf8') : frame.fields[name];
    if (original[name] !== want) problem(`${frame.id}: dead letter fields.${name} ${JSON.stringify(original[name])} != sent ${JSON.stringify(want)}`);
  }
  if (original.image_bytes !== String(frame.fields.image.length)) problem(`${frame.id}: fields.image_bytes wrong`);
  return { frame: frame.id, fields };
});

const report = { sent, results: reportResults, dead: reportDead, problems };
if (args.out) writeFileSync(args.out, JSON.stringify(report, null, 1));
console.log(`${reportResults.length} results, ${reportDead.length} dead letters, ${problems.length} problem(s)`);
for (const p of problems) console.log(`PROBLEM ${p}`);
process.exit(problems.length ? 1 : 0);
