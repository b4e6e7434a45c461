"""The official OpenAI and Anthropic Python SDKs against ibex-proxy (issue 15).

Run by tests/tests/routes.rs with IBEX_BASE (http://127.0.0.1:PORT), IBEX_PAT (read,chat,embeddings),
IBEX_AGENT. The fake providers behind the proxy answer "hi" plainly and "first last" streamed.
Prints one line per check and exits non-zero on the first failure.
"""
import os
import sys

import anthropic
import openai

base = os.environ["IBEX_BASE"]
pat = os.environ["IBEX_PAT"]
agent = os.environ["IBEX_AGENT"]
headers = {"X-IBEX-Agent-ID": agent}


def check(name, cond, got):
    if not cond:
        print(f"FAIL {name}: {got!r}")
        sys.exit(1)
    print(f"ok {name}")


oa = openai.OpenAI(base_url=f"{base}/v1", api_key=pat, default_headers=headers, max_retries=0)

chat = oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
check("openai chat", chat.choices[0].message.content == "hi" and chat.usage.total_tokens == 18, chat)

text = ""
for chunk in oa.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
check("openai chat stream", text == "first last", text)

resp = oa.responses.create(model="gpt-4o", input="hi")
check("openai responses", resp.output_text == "hi" and resp.usage.total_tokens == 13, resp)

kinds = []
deltas = ""
for event in oa.responses.create(model="gpt-4o", input="hi", stream=True):
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        deltas += event.delta
check(
    "openai responses stream",
    deltas == "first last" and kinds[0] == "response.created" and kinds[-1] == "response.completed",
    (kinds, deltas),
)

emb = oa.embeddings.create(model="text-embedding-3-small", input="hi", encoding_format="float")
check("openai embeddings", emb.data[0].embedding == [0.25, 0.5] and emb.usage.prompt_tokens == 6, emb)

# The Anthropic SDK sends the PAT as x-api-key.
an = anthropic.Anthropic(base_url=base, api_key=pat, default_headers=headers, max_retries=0)
msg = an.messages.create(
    model="claude-3-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
)
check(
    "anthropic messages",
    msg.content[0].text == "hi" and msg.usage.cache_read_input_tokens == 100,
    msg,
)

with an.messages.stream(
    model="claude-3-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check(
    "anthropic messages stream",
    streamed == "first last" and final.usage.output_tokens == 15,
    (streamed, final.usage),
)

try:
    oa.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}])
    check("openai error envelope", False, "no error")
except openai.NotFoundError as e:
    check("openai error envelope", e.status_code == 404 and "MODEL_NOT_FOUND" in str(e.body), e.body)
print("sdk: all checks passed")
