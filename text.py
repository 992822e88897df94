"""Text conditioning: captions to token ids, and the text encoders the U-Net's cross-attention reads.

Everywhere in this repository a caption travels as a row of token ids (B, L), int64, padded on the right with 0.
A row of zeros is the empty caption, which is also the null condition of classifier-free guidance: training drops
captions to it, and guidance subtracts its prediction.

Two encoders (config field text_encoder), behind one interface: `encoder(tokens)` returns the token features
(B, L', D) and a mask (B, L') of the ones to attend to, and `encoder.dim` is D. The first feature is always
attended to (a learned start token in front, L' = L + 1; or CLIP's own start token, L' = L), so that even the empty
caption gives the cross-attention something to read.

    transformer   a small transformer trained with the U-Net, over a vocabulary of the words of the training
                  captions (built by train.py and saved in the config, so sampling needs no data)
    clip          a frozen pretrained CLIP text encoder (optional: pip install transformers), from a local folder
                  or a Hugging Face Hub id (config field text_model); its features are cached per caption

Imports config only.
"""

import re

import torch
from torch import nn

import config

PAD = 0
UNKNOWN = 1  # a word the vocabulary lacks; only the tokenizer of a prompt can meet one, and it refuses it
FIRST_WORD = 2
CLIP_DEFAULT = "openai/clip-vit-base-patch32"


class TextError(config.UserError):
    """A caption or prompt the model cannot read, or a text encoder that cannot be loaded."""


# A word: one CJK ideograph (Chinese is written without spaces), or a run of other letters and digits of any script.
WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def words(caption):
    """The words of a caption, lower case: each CJK ideograph, and each run of other letters and digits (of any
    script); spaces, punctuation and symbols separate words and are dropped."""
    return WORD.findall(caption.lower())


def build_vocabulary(captions):
    """The sorted distinct words of `captions`: the vocabulary of the transformer encoder."""
    return tuple(sorted({word for caption in captions for word in words(caption)}))


class WordTokenizer:
    """Captions to ids over a fixed vocabulary: word i of the vocabulary is id i + FIRST_WORD, 0 is padding."""

    def __init__(self, vocabulary, max_length):
        self.vocabulary = tuple(vocabulary)
        self.max_length = max_length
        self.ids = {word: index + FIRST_WORD for index, word in enumerate(self.vocabulary)}

    def __call__(self, captions):
        """(B, max_length) int64 ids of a list of captions. Raises TextError for an unknown word or a caption
        longer than max_length words, naming it."""
        rows = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            caption_words = words(caption)
            unknown = [word for word in caption_words if word not in self.ids]
            if unknown:
                raise TextError(f"the word {unknown[0]!r} of {caption!r} is not in this model's vocabulary of "
                                f"{len(self.vocabulary)} words ({', '.join(self.vocabulary[:40])}"
                                f"{', ...' if len(self.vocabulary) > 40 else ''})")
            if len(caption_words) > self.max_length:
                raise TextError(f"{caption!r} has {len(caption_words)} words, more than max_caption_length "
                                f"{self.max_length}; shorten it, or train with a larger --max-caption-length")
            rows[row, :len(caption_words)] = torch.tensor([self.ids[word] for word in caption_words], dtype=torch.long)
        return rows


class TransformerTextEncoder(nn.Module):
    """Token and position embeddings, a learned start token in front, then pre-norm transformer layers whose
    attention ignores the padding; trained with the U-Net."""

    def __init__(self, vocab_size, max_length, dim, num_layers, num_heads=4):
        super().__init__()
        self.dim = dim
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.position_embed = nn.Parameter(torch.randn(max_length + 1, dim) * 0.02)  # + 1: the start token
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        """tokens (B, L) -> features (B, L + 1, dim) float32, mask (B, L + 1) bool (True = a real token)."""
        batch_size, length = tokens.shape
        mask = torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device), tokens != PAD], dim=1)
        h = torch.cat([self.start.expand(batch_size, 1, -1), self.token_embed(tokens)], dim=1)  # (B, L + 1, dim)
        h = h + self.position_embed[:length + 1]
        h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise TextError("--text-encoder clip needs the transformers library: pip install transformers") from None
    return transformers


def _load_clip(name):
    """CLIP's tokenizer and text model from a local folder or a Hub id; TextError when it cannot be had."""
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.CLIPTextModel.from_pretrained(name)
    except (OSError, ValueError) as error:  # no such folder, no network, not a CLIP checkpoint
        gist = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TextError(f"could not load the CLIP text encoder {name!r} ({gist}); on a machine with internet, run "
                        f"`huggingface-cli download {name}` once (it fills the Hugging Face cache, which is read "
                        f"offline afterwards), or download it to a folder and train with --text-model FOLDER") from None
    return tokenizer, model.eval().requires_grad_(False)


class ClipTokenizer:
    """Captions to CLIP's token ids, shifted up by one so that 0 is padding as everywhere here; the empty caption
    is a row of zeros (ClipTextEncoder turns it back into CLIP's start and end tokens)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, captions):
        rows = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            if not caption.strip():
                continue  # the empty caption: all padding
            ids = self.tokenizer(caption)["input_ids"]  # [start, ..., end]
            if len(ids) > self.max_length:
                raise TextError(f"{caption!r} is {len(ids)} CLIP tokens, more than max_caption_length "
                                f"{self.max_length}; shorten it, or train with a larger --max-caption-length")
            rows[row, :len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
        return rows


class ClipTextEncoder(nn.Module):
    """A frozen CLIP text model: the features of its last layer, computed once per distinct caption and cached.

    It holds no trainable weights and none in the state dict (checkpoints stay small; the config names the
    model), so it is kept out of the module tree and follows the input's device by itself."""

    def __init__(self, name, max_length):
        super().__init__()
        tokenizer, clip = _load_clip(name)
        positions = clip.config.max_position_embeddings
        if max_length > positions:
            raise TextError(f"max_caption_length {max_length} is more than the {positions} tokens the CLIP text "
                            f"encoder {name!r} reads; use --max-caption-length {positions} or less")
        object.__setattr__(self, "clip", clip)  # not a submodule: no parameters, no state-dict entries
        self.tokenizer = tokenizer
        self.dim = clip.config.hidden_size
        empty = tokenizer("")["input_ids"]  # [start, end]
        self.empty_ids = torch.tensor(empty, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else empty[-1]
        self.cache = {}

    def __deepcopy__(self, memo):
        return self  # frozen and stateless to the training: the EMA copy may share it

    @torch.no_grad()
    def encode(self, tokens):
        """Token rows (B, L) of ClipTokenizer -> CLIP features (B, L, D) float32 and mask (B, L), uncached."""
        # At least room for [start, end], which the empty caption becomes (model(x_t, t) passes one column).
        tokens = nn.functional.pad(tokens, (0, max(0, len(self.empty_ids) - tokens.shape[1])))
        ids = tokens - 1
        empty = (tokens == PAD).all(dim=1)
        ids[:, :len(self.empty_ids)][empty] = self.empty_ids.to(tokens.device)
        mask = ids >= 0
        ids = ids.masked_fill(~mask, self.pad_id)
        if self.clip.device != tokens.device:
            self.clip.to(tokens.device)
        features = self.clip(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        return features, mask

    def forward(self, tokens):
        """tokens (B, L) -> features (B, L, D), mask (B, L); the first token (CLIP's start) is always real."""
        keys = [tuple(row) for row in tokens.tolist()]
        missing = [index for index, key in enumerate(keys) if key not in self.cache]
        if missing:
            features, mask = self.encode(tokens[missing])
            for row, index in enumerate(missing):
                self.cache[keys[index]] = (features[row].cpu(), mask[row].cpu())
        features = torch.stack([self.cache[key][0] for key in keys]).to(tokens.device)
        mask = torch.stack([self.cache[key][1] for key in keys]).to(tokens.device)
        return features, mask


def create_text_encoder(cfg):
    """The text encoder of a config (None for text_encoder "none")."""
    if cfg.text_encoder == "transformer":
        return TransformerTextEncoder(len(cfg.vocabulary) + FIRST_WORD, cfg.max_caption_length, cfg.text_dim,
                                      cfg.text_layers)
    if cfg.text_encoder == "clip":
        return ClipTextEncoder(cfg.text_model or CLIP_DEFAULT, cfg.max_caption_length)
    return None


def create_tokenizer(cfg, text_encoder=None):
    """The tokenizer that makes the token rows the config's encoder reads (None for text_encoder "none")."""
    if cfg.text_encoder == "transformer":
        return WordTokenizer(cfg.vocabulary, cfg.max_caption_length)
    if cfg.text_encoder == "clip":
        if text_encoder is None:
            text_encoder = ClipTextEncoder(cfg.text_model or CLIP_DEFAULT, cfg.max_caption_length)
        return ClipTokenizer(text_encoder.tokenizer, cfg.max_caption_length)
    return None


def masked_mean(features, mask):
    """The mean of the features (B, L, D) over the tokens the mask (B, L) keeps: (B, D)."""
    weights = mask.to(features.dtype)[:, :, None]
    return (features * weights).sum(dim=1) / weights.sum(dim=1)

