"""Reference outputs from HF transformers and tokenizers, for Flotilla's parity tests.

    deploy/transformer/hf-env.sh python deploy/transformer/hf_reference.py tiny
        writes common/torch/tests/fixtures/tiny-bert/ (a 2-layer BERT made here with a seeded random init,
        its own small WordPiece tokenizer.json, and expected.json: the token ids HF's tokenizer gives
        for fixed sentences and the pooled outputs HF's BertModel gives for them)

    deploy/transformer/hf-env.sh python deploy/transformer/hf_reference.py minilm MODEL_DIR
        writes common/torch/tests/fixtures/minilm-reference.json: the same for all-MiniLM-L6-v2 (its
        weights stay in the cache; the test compares when the cache has them)

The Rust tests (common/torch/tests/bert_parity.rs) read these files; CI needs no Python.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "common", "torch", "tests", "fixtures")

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up and runs away.",
    "Café prices rose 3.5% in Zürich!",
    "UNKNOWN symbols ☃ and words like xylophone",
    "ok",
]
MAX_LENGTH = 24


def tokenize(tokenizer, max_length):
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return [tokenizer.encode(s).ids for s in SENTENCES]


def padded(ids):
    """Token id lists as a batch padded to the longest (with 0), and its attention mask."""
    longest = max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return input_ids, mask


def pooled_outputs(model, ids):
    input_ids, mask = padded(ids)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask)
    hidden = out.last_hidden_state
    weights = mask.unsqueeze(-1).float()
    mean = (hidden * weights).sum(1) / weights.sum(1)
    return {"cls": out.pooler_output.tolist(), "mean": mean.tolist()}


def tiny_tokenizer():
    words = (
        "a man is eating food the quick brown fox jumps over lazy dog again and until finally wakes up runs away "
        "cafe prices rose in zurich unknown symbols words like ok"
    ).split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!%?'") + words + letters + ["##" + c for c in letters]
    vocab = list(dict.fromkeys(vocab))
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.decoder = decoders.WordPiece()
    # The trap all-MiniLM-L6-v2's tokenizer.json carries: fixed padding and truncation built in.
    tokenizer.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(16)
    return tokenizer


def write_tiny():
    out = os.path.join(FIXTURES, "tiny-bert")
    os.makedirs(out, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    # Non-trivial LayerNorm and bias values, so that a wrong use of them shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config.save_pretrained(out)
    # Saved with HF's `bert.` prefix (all-MiniLM-L6-v2 has none): the loader must take both.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    ids = tokenize(tokenizer, MAX_LENGTH)
    expected = {"sentences": SENTENCES, "max_length": MAX_LENGTH, "ids": ids, **pooled_outputs(model.bert, ids)}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"wrote {out}")


def write_minilm(model_dir):
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    model = BertModel.from_pretrained(model_dir).eval()
    max_length = 32
    ids = tokenize(tokenizer, max_length)
    reference = {"sentences": SENTENCES, "max_length": max_length, "ids": ids, **pooled_outputs(model, ids)}
    path = os.path.join(FIXTURES, "minilm-reference.json")
    with open(path, "w") as f:
        json.dump(reference, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["tiny"]:
        write_tiny()
    elif sys.argv[1:2] == ["minilm"] and len(sys.argv) == 3:
        write_minilm(sys.argv[2])
    else:
        sys.exit(__doc__)
