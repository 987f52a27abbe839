"""``embed.encoder: transformers``: a user's own model folder as the text encoder.

The models are tiny ones built and saved here (BERT with a WordPiece vocabulary, a T5 encoder and a
T5 encoder-decoder, a decoder-only GPT-2 with a word-level tokenizer), so everything runs offline.
Each pooling is checked against a computation of its own on the saved model's last_hidden_state.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from imager import config
from imager.errors import ConfigError, EncoderError
from imager.text.base import pool
from imager.text.cache import EmbeddingCache
from imager.text.factory import load_text_encoder

FP32 = dict(rtol=1e-5, atol=1e-5)
WORDS = ["a", "the", "red", "blue", "green", "heart", "flag", "japan", "emoji", "face", "smiling", "cat", "with", "big"]
CAPTIONS = ["red heart", "a smiling cat face with big heart", "zebra", ""]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access: any accidental download fails fast instead of hanging on the network."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def embed_cfg(path, **settings):
    section = {"encoder": "transformers", "max_length": 8, "transformers": {"path": str(path), **settings}}
    return config.parse({"embed": section}).embed


def shake(model, seed: int):
    """Move every parameter off its init (LayerNorm ones and zero biases too), so that a wrong
    weight or a skipped layer shows in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def word_tokenizer(special: dict[str, int], template: str | None, **kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**special, **{w: i + len(special) for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, special[t]) for t in special if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs), len(vocab)


def bert_model(vocab_size: int, seed: int):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(seed)
    return shake(BertModel(cfg), seed)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT with a WordPiece tokenizer built from a vocab.txt, saved in one folder."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("".join(f"{w}\n" for w in vocab), encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(folder)  # reads vocab.txt, offline
    assert tokenizer("red heart zebra")["input_ids"] == [2, 7, 10, 1, 3]  # [CLS] red heart [UNK] [SEP]
    model = bert_model(len(vocab), seed=0)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return model, tokenizer, folder


def reference(model, tokenizer, captions, max_length=8):
    """(states (B, L, D) of the saved model, mask (B, L)) for the padded batch, run directly."""
    batch = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return states.double(), batch["attention_mask"].bool()


# ----------------------------------------------------------------------------------------- pooling


def test_pool_reads_the_mask_on_either_side():
    tokens = torch.tensor([[[1.0, -5.0], [3.0, -2.0], [9.0, 9.0]],  # right padding: 2 real tokens
                           [[9.0, 9.0], [-4.0, -1.0], [2.0, -3.0]],  # left padding: 2 real tokens
                           [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]]])  # no real token (large padding states)
    mask = torch.tensor([[True, True, False], [False, True, True], [False, False, False]])
    assert pool(tokens, mask, "cls").tolist() == [[1.0, -5.0], [-4.0, -1.0], [0.0, 0.0]]
    assert pool(tokens, mask, "last").tolist() == [[3.0, -2.0], [2.0, -3.0], [0.0, 0.0]]
    assert pool(tokens, mask, "max").tolist() == [[3.0, -2.0], [2.0, -1.0], [0.0, 0.0]]
    assert pool(tokens * mask.unsqueeze(-1), mask, "mean").tolist() == [[2.0, -3.5], [-1.0, -2.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="sum"):
        pool(tokens, mask, "sum")


# -------------------------------------------------------------------------------------------- BERT


def test_bert_loads_through_the_factory(bert):
    model, tokenizer, folder = bert
    enc = load_text_encoder(embed_cfg(folder))
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (32, 32, 8)
    emb = enc.encode(CAPTIONS)
    states, mask = reference(model, tokenizer, CAPTIONS)
    assert emb.tokens.shape == (4, 8, 32) and emb.pooled.shape == (4, 32) and emb.tokens.dtype == torch.float32
    assert emb.mask.sum(1).tolist() == [4, 8, 3, 2] and torch.equal(emb.mask, mask)  # [CLS] words [SEP], cut at 8
    assert emb.truncated == 1
    assert torch.all(emb.tokens[~emb.mask] == 0)
    torch.testing.assert_close(emb.tokens.double(), states * mask.unsqueeze(-1), **FP32)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
def test_bert_pooling_matches_the_model(bert, pooling):
    model, tokenizer, folder = bert
    emb = load_text_encoder(embed_cfg(folder, pooling=pooling)).encode(CAPTIONS)
    states, mask = reference(model, tokenizer, CAPTIONS)
    counts = mask.sum(1)
    expected = {
        "mean": torch.stack([states[i, :n].mean(0) for i, n in enumerate(counts)]),
        "cls": states[:, 0],
        "max": torch.stack([states[i, :n].amax(0) for i, n in enumerate(counts)]),
        "last": torch.stack([states[i, n - 1] for i, n in enumerate(counts)]),
    }[pooling]
    torch.testing.assert_close(emb.pooled.double(), expected, **FP32)
    others = [p for p in ("mean", "cls", "max", "last") if p != pooling]
    assert all((emb.pooled.double() - load_text_encoder(embed_cfg(folder, pooling=p)).encode(CAPTIONS).pooled.double()).abs().max() > 1e-3 for p in others)


def test_bert_max_never_takes_padding(bert):
    """Padding states are real numbers (pad tokens attend to the caption): a max over every position,
    or over the zeroed tokens, gives another answer than the max over real tokens."""
    model, tokenizer, folder = bert
    emb = load_text_encoder(embed_cfg(folder, pooling="max")).encode(CAPTIONS)
    states, mask = reference(model, tokenizer, CAPTIONS)
    real = torch.stack([states[i, :n].amax(0) for i, n in enumerate(mask.sum(1))])
    assert (states.amax(1) - real).abs().max() > 1e-2  # padding would win somewhere
    assert (real.clamp(min=0) - real).abs().max() > 1e-2  # so would the zeros at padding
    torch.testing.assert_close(emb.pooled.double(), real, **FP32)


def test_normalize_gives_unit_vectors(bert):
    _, _, folder = bert
    plain = load_text_encoder(embed_cfg(folder, pooling="cls")).encode(CAPTIONS).pooled
    unit = load_text_encoder(embed_cfg(folder, pooling="cls", normalize=True)).encode(CAPTIONS).pooled
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(4), **FP32)
    assert not torch.allclose(plain.norm(dim=-1), torch.ones(4), atol=1e-2)
    torch.testing.assert_close(unit, plain / plain.norm(dim=-1, keepdim=True), **FP32)


def test_the_id_names_folder_hash_and_pooling(bert, monkeypatch):
    _, _, folder = bert
    enc = load_text_encoder(embed_cfg(folder, pooling="max", normalize=True))
    prefix, rest = enc.id.split("@")
    digest, settings = rest.split(" ", 1)
    assert prefix == f"transformers:{folder.resolve()}" and len(digest) == 12 and int(digest, 16) >= 0
    assert settings == "pooling=max normalize=true"
    monkeypatch.chdir(folder.parent)  # a relative path is the same folder, the same id
    assert load_text_encoder(embed_cfg(folder.name, pooling="max", normalize=True)).id == enc.id
    assert load_text_encoder(embed_cfg(folder)).id.endswith(f"@{digest} pooling=mean normalize=false")


def test_the_id_changes_when_the_weights_change(bert, tmp_path):
    model, _, folder = bert
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    before = load_text_encoder(embed_cfg(copy))
    (copy / "optimizer.pt").write_bytes(b"training leftovers do not change the model")
    assert load_text_encoder(embed_cfg(copy)).id == before.id
    bert_model(model.config.vocab_size, seed=1).save_pretrained(copy)  # retrained into the same folder
    after = load_text_encoder(embed_cfg(copy))
    assert after.id != before.id and after.id.split("@")[0] == before.id.split("@")[0]
    assert (after.encode(["red heart"]).pooled - before.encode(["red heart"]).pooled).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- T5


@pytest.fixture(scope="module", params=["encoder-decoder", "encoder-only"])
def t5(request, tmp_path_factory):
    """A tiny T5 saved whole (T5Model) or as its encoder alone (T5EncoderModel)."""
    from transformers import T5Config, T5EncoderModel, T5Model

    tokenizer, size = word_tokenizer({"<pad>": 0, "</s>": 1, "<unk>": 2}, "$A </s>", pad_token="<pad>", eos_token="</s>")
    cfg = T5Config(vocab_size=size, d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = shake(T5Model(cfg) if request.param == "encoder-decoder" else T5EncoderModel(cfg), seed=0)
    folder = tmp_path_factory.mktemp("t5")
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return model.get_encoder() if request.param == "encoder-decoder" else model, tokenizer, folder


def test_t5_uses_the_encoder(t5):
    encoder, tokenizer, folder = t5
    enc = load_text_encoder(embed_cfg(folder))
    assert (enc.token_dim, enc.pooled_dim) == (16, 16) and type(enc.model).__name__ in ("T5Stack", "T5EncoderModel")
    emb = enc.encode(CAPTIONS)
    states, mask = reference(encoder, tokenizer, CAPTIONS)
    assert emb.mask.sum(1).tolist() == [3, 8, 2, 1]  # words (unknown ones too) + </s>
    torch.testing.assert_close(emb.tokens.double(), states * mask.unsqueeze(-1), **FP32)
    mean = torch.stack([states[i, :n].mean(0) for i, n in enumerate(mask.sum(1))])
    torch.testing.assert_close(emb.pooled.double(), mean, **FP32)


# ------------------------------------------------------------------------------------ decoder-only


@pytest.fixture(scope="module", params=["right", "left"])
def gpt2(request, tmp_path_factory):
    """A tiny GPT-2 whose word-level tokenizer has no pad token (as GPT-2's own has none), saved to
    pad on the right or on the left."""
    from transformers import GPT2Config, GPT2Model

    tokenizer, size = word_tokenizer({"<|endoftext|>": 0, "<unk>": 1}, None, eos_token="<|endoftext|>", padding_side=request.param)
    cfg = GPT2Config(vocab_size=size, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = shake(GPT2Model(cfg), seed=0)
    folder = tmp_path_factory.mktemp(f"gpt2-{request.param}")
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return model, folder, request.param


def test_decoder_only_last_token(gpt2):
    model, folder, _ = gpt2
    enc = load_text_encoder(embed_cfg(folder, pooling="last"))
    assert enc.tokenizer.pad_token == "<|endoftext|>"
    assert enc.tokenizer.padding_side == "right"  # whatever the folder says: positions as in an unpadded run
    emb = enc.encode(CAPTIONS)
    counts = [2, 7, 1, 0]  # no special tokens: the empty caption has none at all
    assert emb.mask.sum(1).tolist() == counts
    with torch.no_grad():
        for i, n in enumerate(counts):
            if n == 0:
                assert torch.all(emb.pooled[i] == 0)  # nothing was read
                continue
            ids = enc.tokenizer(CAPTIONS[i], return_tensors="pt")["input_ids"]
            alone = model(input_ids=ids).last_hidden_state[0, -1]  # unpadded: the last token
            torch.testing.assert_close(emb.pooled[i], alone, **FP32)
            assert emb.mask[i].nonzero().flatten().tolist() == list(range(n))


# ------------------------------------------------------------------------------------------ errors


def test_the_path_is_required():
    with pytest.raises(ConfigError) as info:
        config.parse({"embed": {"encoder": "transformers"}})
    assert str(info.value) == "params.yaml: embed.transformers.path: required when embed.encoder is 'transformers'"
    config.parse({"embed": {"encoder": "minilm"}})  # only then


def test_a_bad_pooling_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        config.parse({"embed": {"encoder": "transformers", "transformers": {"path": "/m", "pooling": "sum"}}})
    assert str(info.value) == "params.yaml: embed.transformers.pooling: must be one of 'mean', 'cls', 'max' or 'last', got 'sum'"


def write_broken(tmp_path, how: str, bert_folder):
    folder = tmp_path / how
    if how == "not-a-folder":
        folder.write_text("weights?")
        return folder
    folder.mkdir()
    if how == "garbage-config":
        (folder / "config.json").write_text("{not json")
    elif how == "no-weights":
        shutil.copy(bert_folder / "config.json", folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bert_folder / name, folder)
    elif how == "no-tokenizer":
        for name in ("config.json", "model.safetensors"):
            shutil.copy(bert_folder / name, folder)
    elif how == "other-weights":  # a BERT config over a GPT-2's weights: transformers would init at random
        from transformers import GPT2Config, GPT2Model

        GPT2Model(GPT2Config(vocab_size=19, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bert_folder / name, folder)
    elif how == "no-pad-token":  # nothing to pad with: neither a pad nor an end-of-sequence token
        from transformers import GPT2Config, GPT2Model

        tokenizer, size = word_tokenizer({"<unk>": 0}, None)
        tokenizer.save_pretrained(folder)
        GPT2Model(GPT2Config(vocab_size=size, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how, words", [
    ("missing", ["is not a folder"]),
    ("not-a-folder", ["is not a folder"]),
    ("empty", ["transformers cannot load"]),
    ("garbage-config", ["transformers cannot load"]),
    ("no-weights", ["transformers cannot load"]),
    ("no-tokenizer", ["no tokenizer files"]),
    ("other-weights", ["lacks", "weights", "BertModel"]),
    ("no-pad-token", ["neither a pad nor an end-of-sequence token"]),
])
def test_an_unloadable_folder_is_a_one_line_error(bert, tmp_path, how, words):
    folder = tmp_path / "missing" if how == "missing" else write_broken(tmp_path, how, bert[2])
    with pytest.raises(EncoderError) as info:
        load_text_encoder(embed_cfg(folder))
    message = str(info.value)
    assert message.startswith("embed.transformers.path:") and str(folder) in message and "\n" not in message, message
    assert all(w in message for w in words), message


def test_never_downloads(bert, monkeypatch):
    """local_files_only, even with allow_download; a hub name is just a folder that is not there."""
    import transformers

    seen = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("local_files_only"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    section = {"encoder": "transformers", "allow_download": True}
    load_text_encoder(config.parse({"embed": {**section, "transformers": {"path": str(bert[2])}}}).embed)
    assert seen == [True, True]
    with pytest.raises(EncoderError, match="bert-base-uncased' is not a folder"):
        load_text_encoder(config.parse({"embed": {**section, "transformers": {"path": "bert-base-uncased"}}}).embed)


# ------------------------------------------------------------------------------------ embed stage


def test_the_embed_stage_with_a_custom_encoder(bert, tmp_path):
    """`imager embed` on a two-shard folder: the cache holds this model's embeddings and its id."""
    import webdataset as wds

    from stages.app import app
    from tests.conftest import png_bytes, tiny_params

    _, _, folder = bert
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = {"train-000000.tar": [("k0", "red heart"), ("k1", "flag japan")], "val-000000.tar": [("k2", "green cat face")]}
    for name, rows in samples.items():
        with wds.TarWriter(str(shards / name)) as sink:
            for key, caption in rows:
                sink.write({"__key__": key, "txt": caption, "png": png_bytes()})
    index = {"resolution": 16, "splits": {"train": {"count": 2, "shards": ["train-000000.tar"]}, "val": {"count": 1, "shards": ["val-000000.tar"]}}}
    (shards / "index.json").write_text(json.dumps(index), encoding="utf-8")
    embed = {"encoder": "transformers", "max_length": 8, "batch_size": 2, "prompts": ["red heart"],
             "transformers": {"path": str(folder), "pooling": "cls", "normalize": True}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(embed=embed)), encoding="utf-8")
    out, report = tmp_path / "emb", tmp_path / "embed.json"
    result = CliRunner().invoke(app, ["embed", "--params", str(params), "--shards", str(shards), "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    enc = load_text_encoder(embed_cfg(folder, pooling="cls", normalize=True))
    cache = EmbeddingCache(out)
    assert cache.keys == ["k0", "k1", "k2"] and cache.meta["encoder"] == enc.id
    assert (cache.meta["token_dim"], cache.meta["pooled_dim"], cache.meta["max_length"]) == (32, 32, 8)
    tokens, mask, pooled = cache.lookup(["k2", "k0"])
    ref = enc.encode(["green cat face", "red heart"])
    assert torch.equal(mask, ref.mask) and torch.equal(pooled, ref.pooled.half()) and torch.equal(tokens, ref.tokens.half())
    torch.testing.assert_close(pooled.float().norm(dim=-1), torch.ones(2), rtol=0, atol=2e-3)
    assert torch.equal(cache.prompt_pooled[0], ref.pooled[1].half())
