// A Node.js agent on AIOS, the two ways another language gets in:
//   (a) the `openai` package against the gateway (API key = the agent's token), and
//   (b) the gRPC kernel through stubs loaded at run time with @grpc/proto-loader.
// Each does a streamed generation, a tool call and a memory write and read; it prints one JSON report.
// Env: AIOS_OPENAI_BASE_URL, AIOS_MODEL, AIOS_KERNEL, AIOS_TOKEN, AIOS_PROTOS (the protos/ root).
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import OpenAI from "openai";

const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`);
  return process.env[name];
};

async function viaOpenAI() {
  const client = new OpenAI({ baseURL: env("AIOS_OPENAI_BASE_URL"), apiKey: env("AIOS_TOKEN"), maxRetries: 0 });
  const model = env("AIOS_MODEL");
  let streamed = "";
  const stream = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Count: 1, 2, 3," }], max_tokens: 8, temperature: 0, stream: true,
  });
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
  const tools = [{
    type: "function",
    function: {
      name: "get_weather", description: "The weather in a city.",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  }];
  const called = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Weather in Oslo?" }], tools, tool_choice: "required",
    parallel_tool_calls: false, temperature: 0, max_tokens: 60,
  });
  const call = called.choices[0].message.tool_calls[0];
  // Memory through AIOS's own body fields: `remember` writes the turns, `history_turns` reads them back.
  await client.chat.completions.create({
    model, messages: [{ role: "user", content: "My favourite river is the Danube." }], max_tokens: 4, temperature: 0,
    remember: true,
  });
  const recalled = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Which river?" }], max_tokens: 4, temperature: 0, history_turns: 2,
  });
  return {
    streamed, tool: call.function.name, tool_arguments: JSON.parse(call.function.arguments),
    finish_reason: called.choices[0].finish_reason, history_prompt_tokens: recalled.usage.prompt_tokens,
  };
}

function kernelStub(options = { "grpc.max_receive_message_length": 64 * 1024 * 1024 }) {
  // The options a Node client needs: the include root is protos/ (imports say "aios/v1/..."), keepCase keeps the
  // snake_case field names, and the receive limit is raised from 4 MB (whole generations, records).
  const definition = protoLoader.loadSync("aios/v1/kernel.proto", {
    includeDirs: [env("AIOS_PROTOS")], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const { aios } = grpc.loadPackageDefinition(definition);
  return new aios.v1.Kernel(env("AIOS_KERNEL"), grpc.credentials.createInsecure(), options);
}

function unary(stub, method, request, metadata) {
  return new Promise((resolve, reject) =>
    stub[method](request, metadata, { deadline: Date.now() + 60_000 }, (error, reply) => (error ? reject(error) : resolve(reply))));
}

async function viaGrpc() {
  const stub = kernelStub();
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${env("AIOS_TOKEN")}`);
  const chunks = [];
  await new Promise((resolve, reject) => {
    const call = stub.Generate({ prompt: "1, 2, 3,", sampling: { max_tokens: 5, ignore_eos: true } }, metadata);
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", resolve);
  });
  const tool = await unary(stub, "Syscall", { tool_call: { name: "calculator", arguments_json: '{"expression": "6*7"}' } }, metadata);
  const added = await unary(stub, "Syscall", { memory_add: { text: "written from Node.js" } }, metadata);
  const read = await unary(stub, "Syscall", { memory_get: { id: added.memory_add.id } }, metadata);
  let refused = "";
  try {
    await unary(stub, "Syscall", { memory_add: { text: "no token" } }, new grpc.Metadata());
  } catch (error) {
    refused = grpc.status[error.code];
  }
  stub.close();
  return {
    tokens: chunks.filter((c) => c.token_id !== undefined && c.token_id !== null).length,
    finish_reason: chunks.at(-1).finish_reason, syscall_id: chunks.at(-1).syscall_id,
    tool_result: JSON.parse(tool.tool_call.result_json).result, memory: read.memory_get.text, refused,
  };
}

// A record at the 16 MB limit, written and read back by a default-configured client (4 MB receive limit): whole, the
// client refuses the reply; by ranges (offset/length) it reads every byte.
async function bigRecord() {
  const stub = kernelStub({});
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${env("AIOS_TOKEN")}`);
  const data = Buffer.alloc(16 * 1024 * 1024);
  for (let i = 0; i < data.length; i++) data[i] = 97 + ((i * 7 + (i >> 12)) % 26);
  const key = "files/big.txt";
  await unary(stub, "Syscall", { storage_write: { key, data } }, metadata);
  let wholeRead = "OK";
  try {
    await unary(stub, "Syscall", { storage_read: { key } }, metadata);
  } catch (error) {
    wholeRead = grpc.status[error.code];
  }
  const parts = [];
  const chunk = 3 * 1024 * 1024;
  for (let offset = 0; offset < data.length; offset += chunk) {
    const reply = await unary(stub, "Syscall", { storage_read: { key, offset, length: chunk } }, metadata);
    parts.push(reply.storage_read.data);
  }
  stub.close();
  const read = Buffer.concat(parts);
  return { size: data.length, parts: parts.length, equal: read.equals(data), whole_read: wholeRead, key };
}

const report = { openai: await viaOpenAI(), grpc: await viaGrpc(), big: await bigRecord() };
console.log(JSON.stringify(report));
