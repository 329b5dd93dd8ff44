// A Node.js client of the OpenAI HTTP API of `optiq serve --http-port`, using the
// official `openai` npm package.
//
//   node openai_client.mjs BASE_URL MODEL        (BASE_URL like http://127.0.0.1:PORT/v1)
//
// Lists models, runs one chat completion whole and streamed (they must agree), checks
// the error status of an unknown model, then abandons a long stream and waits until
// the server reports the slot free. Prints one JSON line; exits non-zero on a failed
// expectation. Run by tests/test_http_openai.py.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error("usage: node openai_client.mjs BASE_URL MODEL");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });

function fail(message) {
  console.error("FAIL: " + message);
  process.exit(1);
}

async function health() {
  const r = await fetch(new URL("/health", baseURL));
  return r.json();
}

async function waitIdle(timeoutMs) {
  const start = Date.now();
  for (;;) {
    const h = await health();
    if (h.active_requests === 0 && h.queued_requests === 0) return h;
    if (Date.now() - start > timeoutMs) fail("slot not freed: " + JSON.stringify(h));
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function main() {
  const models = (await client.models.list()).data.map((m) => m.id);

  const request = {
    model,
    messages: [{ role: "user", content: "Say hello." }],
    max_tokens: 8,
    ignore_eos: true, // an extension field: passed through in the body
    chat_template_kwargs: { enable_thinking: false },
  };
  const whole = await client.chat.completions.create(request);
  let streamed = "";
  const stream = await client.chat.completions.create({ ...request, stream: true });
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";

  let notFoundStatus = null;
  try {
    await client.chat.completions.create({ ...request, model: "no-such-model" });
  } catch (err) {
    notFoundStatus = err.status;
  }

  const before = await health();
  const long = await client.chat.completions.create({
    ...request,
    max_tokens: 100000,
    stream: true,
  });
  let chunks = 0;
  for await (const _ of long) {
    if (++chunks === 3) break; // leaving the loop aborts the HTTP request
  }
  const after = await waitIdle(300000); // a hang guard only: it waits on the reported load
  if (after.requests_cancelled <= before.requests_cancelled) fail("server did not count the cancel");

  console.log(
    JSON.stringify({
      models,
      whole: whole.choices[0].message.content,
      streamed,
      finish_reason: whole.choices[0].finish_reason,
      completion_tokens: whole.usage.completion_tokens,
      not_found_status: notFoundStatus,
      active_after_abort: after.active_requests,
    })
  );
}

main().catch((err) => fail(err.stack || String(err)));
