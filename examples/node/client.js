#!/usr/bin/env node
// Streams an answer from a stageserve router using only the .proto contract:
// @grpc/proto-loader reads protos/generation.proto at run time, @grpc/grpc-js calls it.
//
//   npm install
//   node client.js --addr 127.0.0.1:50051 --max-new-tokens 32 "Hello"
//   node client.js --addr router.example:50051 --tls-ca ca.pem --auth-token-file token "Hello"
//
// Like the Python client: --tls-ca connects over TLS trusting that CA (--tls-server-name if
// the certificate names another host than --addr); --auth-token-file sends the file's first
// token as `authorization: Bearer <token>` ($STAGESERVE_AUTH_TOKEN_FILE by default).
//
// Text goes to stdout as it streams. --json prints one JSON summary line at the end
// instead (token ids, finish reason, ...). Exit status: 0 when the call ended OK, 1 on a
// gRPC error (printed as CODE: details), 2 on bad arguments.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = 'usage: node client.js [--addr HOST:PORT] [--proto-dir DIR] [--max-new-tokens N] ' +
  '[--temperature T] [--seed S] [--ignore-eos] [--timeout SECONDS] [--request-id ID] [--json] ' +
  '[--tls-ca FILE] [--tls-server-name NAME] [--auth-token-file FILE] PROMPT';

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      addr: { type: 'string', default: '127.0.0.1:50051' },
      // Default: the repository's protos/ folder, two levels up from examples/node.
      'proto-dir': { type: 'string', default: path.join(__dirname, '..', '..', 'protos') },
      'max-new-tokens': { type: 'string', default: '32' },
      temperature: { type: 'string', default: '0' },
      seed: { type: 'string' },
      timeout: { type: 'string' },
      'request-id': { type: 'string', default: '' },
      'ignore-eos': { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-server-name': { type: 'string' },
      // Compose passes "${VAR:-}": an empty value means "not set".
      'auth-token-file': { type: 'string', default: process.env.STAGESERVE_AUTH_TOKEN_FILE || undefined },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help || positionals.length !== 1) {
    throw new Error(USAGE);
  }
  const number = (name) => {
    const value = Number(values[name]);
    if (!Number.isFinite(value)) throw new Error(`--${name} must be a number, got ${values[name]}\n${USAGE}`);
    return value;
  };
  return {
    addr: values.addr,
    protoDir: values['proto-dir'],
    prompt: positionals[0],
    maxNewTokens: number('max-new-tokens'),
    temperature: number('temperature'),
    seed: values.seed === undefined ? undefined : values.seed,
    timeoutSeconds: values.timeout === undefined ? undefined : number('timeout'),
    requestId: values['request-id'],
    ignoreEos: values['ignore-eos'],
    json: values.json,
    tlsCa: values['tls-ca'],
    tlsServerName: values['tls-server-name'],
    token: values['auth-token-file'] === undefined ? undefined : readToken(values['auth-token-file']),
  };
}

// The first non-empty line of the file (the router accepts any line of its own file).
function readToken(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read the auth token file ${file}: ${err.message}`);
  }
  const token = text.split('\n').map((line) => line.trim()).find((line) => line.length > 0);
  if (token === undefined) throw new Error(`the auth token file ${file} holds no token`);
  return token;
}

function channelCredentials(args) {
  if (args.tlsCa === undefined) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(fs.readFileSync(args.tlsCa));
}

function loadGenerationService(protoDir) {
  const definition = protoLoader.loadSync(path.join(protoDir, 'generation.proto'), {
    keepCase: true, // field names exactly as in the .proto (max_new_tokens, token_ids)
    longs: String, // uint64 (seed) without precision loss
    enums: String, // finish_reason as its name, e.g. FINISH_REASON_LENGTH
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).stageserve.v1.Generation;
}

function main() {
  let args;
  try {
    args = parseCommandLine(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }
  const Generation = loadGenerationService(args.protoDir);
  let credentials;
  try {
    credentials = channelCredentials(args);
  } catch (err) {
    process.stderr.write(`cannot read the CA file ${args.tlsCa}: ${err.message}\n`);
    process.exit(2);
  }
  const channelOptions = args.tlsServerName === undefined ? {} : { 'grpc.ssl_target_name_override': args.tlsServerName };
  const client = new Generation(args.addr, credentials, channelOptions);
  const metadata = new grpc.Metadata();
  if (args.token !== undefined) metadata.set('authorization', `Bearer ${args.token}`);

  const sampling = { max_new_tokens: args.maxNewTokens, temperature: args.temperature, ignore_eos: args.ignoreEos };
  if (args.seed !== undefined) sampling.seed = args.seed;
  const request = { prompt: args.prompt, sampling, request_id: args.requestId };
  const options = {};
  if (args.timeoutSeconds !== undefined) {
    options.deadline = new Date(Date.now() + args.timeoutSeconds * 1000);
  }

  const summary = { token_ids: [], text: '', finish_reason: '', error_message: '', prompt_tokens: 0, messages: 0 };
  const call = client.Generate(request, metadata, options);
  call.on('data', (msg) => {
    summary.messages += 1;
    summary.token_ids.push(...msg.token_ids);
    summary.text += msg.text;
    if (!args.json) process.stdout.write(msg.text);
    if (msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
      summary.finish_reason = msg.finish_reason;
      summary.error_message = msg.error_message;
      summary.prompt_tokens = msg.prompt_tokens;
    }
  });
  call.on('error', (err) => {
    process.stderr.write(`${grpc.status[err.code]}: ${err.details}\n`);
    client.close();
    process.exitCode = 1;
  });
  call.on('end', () => {
    if (args.json) {
      process.stdout.write(`${JSON.stringify(summary)}\n`);
    } else {
      // stdout is the answer alone, as with `stageserve generate`.
      process.stdout.write('\n');
      process.stderr.write(`[finish: ${summary.finish_reason}]\n`);
    }
    client.close();
  });
}

main();
