// Validates spec/streams.asyncapi.yaml as an AsyncAPI document with the reference parser (@asyncapi/parser):
// prints every diagnostic, exits 1 on any error (and on warnings other than the allowed informational ones).
// Usage: node tests/node/validate_spec.mjs [path/to/streams.asyncapi.yaml]
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const here = path.dirname(fileURLToPath(import.meta.url));
const specPath = process.argv[2] ?? path.join(here, '..', '..', 'spec', 'streams.asyncapi.yaml');
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(specPath, 'utf8'), { source: specPath });
const severity = { 0: 'error', 1: 'warning', 2: 'info', 3: 'hint' };
for (const d of diagnostics) {
  console.log(`${severity[d.severity]} ${d.code} at ${d.path.join('.')}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
const warnings = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Warning);
if (!document || errors.length || warnings.length) {
  console.log(`INVALID: ${errors.length} error(s), ${warnings.length} warning(s)`);
  process.exit(1);
}
const channels = document.channels().all().map((c) => `${c.id()}=${c.address()}`);
const messages = document.components().messages().all().map((m) => m.id());
console.log(`VALID AsyncAPI ${document.version()}: channels ${channels.join(', ')}; messages ${messages.join(', ')}`);
