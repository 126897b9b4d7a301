"""Reference outputs from HF transformers for SmolLM2-135M-Instruct loaded from its GGUF, for
Flotilla's decoder parity test (common/torch/tests/llama_parity.rs).

    deploy/transformer/hf-env.sh python deploy/transformer/decoder_reference.py GGUF_FILE

writes common/torch/tests/fixtures/smollm2-reference.json: for fixed strings, the token ids of HF's
tokenizer as loaded from the GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) and of the
same tokenizer with the upstream SmolLM2 pre-tokenizer (digits split one by one, which HF's GGUF
loader does not restore for `tokenizer.ggml.pre = smollm`); for fixed prompts (chat template
applied), the last position's logits in full (first prompt) and every position's logits at a fixed set of token
ids, from `LlamaForCausalLM` loaded from the same GGUF (dequantized to f32); and 32 greedy tokens.
The weights stay in the cache; CI needs no Python.
"""

import json
import os
import sys

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "common", "torch", "tests", "fixtures", "smollm2-reference.json")

STRINGS = [
    "Hello world",
    " leading space and  two  spaces",
    "Café prices rose 3.5% in Zürich in 2026!",
    "Emoji ☃ and 中文 text\nwith a newline\n\n",
    "<|im_start|>user\nWrite a headline.<|im_end|>\n<|im_start|>assistant\n",
    "don't we'll THEY'RE",
]
PROMPTS = [
    "Write a one-line headline for this article: Shares in the company rose sharply after it reported record profits.",
    "What is the capital of France?",
    "Give me three words that rhyme with cat.",
]
PROBE_IDS = list(range(0, 49152, 389))
NEW_TOKENS = 32


def rounded(values):
    return [round(v, 5) for v in values.tolist()]


def main(gguf_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

    ggufs_ids = [tokenizer(s, add_special_tokens=True)["input_ids"] for s in STRINGS]
    upstream = tokenizer.backend_tokenizer
    upstream.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    upstream_ids = [upstream.encode(s).ids for s in STRINGS]

    prompts = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = upstream.encode(text).ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            # The mask is given: inferred from pad_token_id (2, which is also <|im_end|>) it would hide
            # the prompt's own <|im_end|> tokens.
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[0, len(ids):].tolist()
        prompts.append(
            {
                "prompt": prompt,
                "text": text,
                "ids": ids,
                # Rounded to 1e-5 (the test allows 1e-4); the full vocabulary for the first prompt only.
                "last_logits": rounded(logits[-1]) if not prompts else None,
                "probe_logits": [rounded(row) for row in logits[:, PROBE_IDS]],
                "greedy": generated,
                "greedy_text": tokenizer.decode(generated),
            }
        )
        print(f"{prompt!r} -> {tokenizer.decode(generated)!r}", file=sys.stderr)

    reference = {
        "strings": STRINGS,
        "gguf_tokenizer_ids": ggufs_ids,
        "upstream_tokenizer_ids": upstream_ids,
        "probe_ids": PROBE_IDS,
        "prompts": prompts,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(OUT, "w") as f:
        json.dump(reference, f)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
