// Validates an AsyncAPI document with the AsyncAPI project's parser (installed into
// .asyncapi-parser by scripts/install-test-deps.sh): prints every diagnostic, exits 1 when
// one is an error. Used by tests/catalog.rs.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(process.argv[2] + '/');
const { Parser } = require('@asyncapi/parser');
const { document, diagnostics } = await new Parser().parse(readFileSync(process.argv[3], 'utf8'));
const severities = ['error', 'warning', 'info', 'hint'];
for (const d of diagnostics) {
  console.log(`${severities[d.severity]} ${d.code} ${JSON.stringify(d.path)}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === 0);
process.exit(document && errors.length === 0 ? 0 : 1);
