"""Text conditioning: tokenizers, the text encoders, cross-attention, captioned data, guidance with the empty caption,
training and sampling a captioned run, prompt accuracy's read-back, and the CLIP wiring with a tiny random CLIP."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import dataset
import prompts
import sample
import text
import train
import utils
from conftest import TINY, randomise_zero_layers_, reference_library
from diffusion import create_diffusion
from model import CrossAttention, create_model
from test_train import stop_at_loss_call

TEXT = dict(TINY, text_encoder="transformer", text_dim=32, text_layers=1, max_caption_length=12)
CAPTIONS = ["a small red circle at the top left on a black background", "a large blue cross in the middle",
            "a green square"]


def text_config(**overrides):
    vocabulary = text.build_vocabulary(CAPTIONS)
    return config.get_config("demo", **{**TEXT, "vocabulary": vocabulary, **overrides})


def text_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomise_zero_layers_(create_model(text_config(**overrides))).eval()


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- tokenizer and vocabulary --------------------------------------------------------------------------

def test_words_and_vocabulary_ignore_case_and_punctuation():
    assert text.words("A large, GREEN cross.") == ["a", "large", "green", "cross"]
    # Letters of any script; Chinese, written without spaces, one word per character.
    assert text.words("Un café_noir: 红色的圆!") == ["un", "café", "noir", "红", "色", "的", "圆"]
    assert text.build_vocabulary(["b a", "a c"]) == ("a", "b", "c")


def test_word_tokenizer_pads_with_zeros_and_the_empty_caption_is_all_padding():
    tokenizer = text.WordTokenizer(("a", "cross", "green"), max_length=5)
    tokens = tokenizer(["a green cross", ""])
    assert tokens.tolist() == [[2, 4, 3, 0, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("caption, message", [("a pink cross", "'pink'"), ("a a a a a a", "6 words")])
def test_word_tokenizer_refuses_unknown_words_and_long_captions(caption, message):
    with pytest.raises(text.TextError, match=message):
        text.WordTokenizer(("a", "cross"), max_length=5)([caption])


# --- cross-attention and the conditional U-Net ---------------------------------------------------------------

def test_cross_attention_reads_the_text_and_ignores_what_the_mask_hides():
    torch.manual_seed(0)
    block = randomise_zero_layers_(CrossAttention(32, 16, num_heads=2))
    x = torch.randn(2, 32, 4, 4)
    context = torch.randn(2, 3, 16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = block(x, context, mask)
    # Other text, another output.
    assert not torch.allclose(block(x, torch.randn(2, 3, 16), mask), out, atol=1e-3)
    # Two more hidden tokens, whatever their values: the same output.
    padded = torch.cat([context, 100 * torch.randn(2, 2, 16)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(block(x, padded, padded_mask), out, atol=1e-6, rtol=1e-5)


def test_cross_attention_is_attention_over_the_text_tokens():
    torch.manual_seed(1)
    block = randomise_zero_layers_(CrossAttention(32, 16, num_heads=1))
    x = torch.randn(1, 32, 2, 2)
    context = torch.randn(1, 3, 16)
    mask = torch.tensor([[True, True, False]])
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (1, 4, 32)
    # Pixel (row, column) gets sin/cos of row * w_i and of column * w_i, w_i = 10000^(-i / 7), i < 8.
    freqs = 10000 ** (-torch.arange(8) / 7)
    code = torch.stack([torch.cat([(r * freqs).sin(), (r * freqs).cos(), (c * freqs).sin(), (c * freqs).cos()])
                        for r in range(2) for c in range(2)])
    q = block.q(tokens + code)
    k = block.k(context[:, :2])
    v = block.v(context[:, :2])
    weights = (q @ k.transpose(1, 2) / 32 ** 0.5).softmax(dim=-1)  # (1, 4, 2)
    expected = x + block.proj(weights @ v).transpose(1, 2).reshape(1, 32, 2, 2)
    torch.testing.assert_close(block(x, context, mask), expected, atol=1e-5, rtol=1e-5)


def test_unet_output_depends_on_the_caption_and_not_on_its_padding():
    cfg = text_config()
    model = text_model()
    tokenizer = text.create_tokenizer(cfg)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 15])
    tokens = tokenizer(CAPTIONS[1:3])
    out = model(x, t, tokens)
    assert not torch.allclose(model(x, t, tokenizer(CAPTIONS[:2])), out, atol=1e-4)
    # The same captions with no padding columns at all, and with two.
    tight = tokens[:, :(tokens != 0).sum(dim=1).max()]
    assert tight.shape[1] < cfg.max_caption_length - 2 and (tight == 0).any()  # the second caption is padded
    torch.testing.assert_close(model(x, t, tight), out, atol=1e-5, rtol=1e-5)
    padded = torch.cat([tight, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(x, t, padded), out, atol=1e-5, rtol=1e-5)


def test_an_unconditional_model_has_no_text_weights():
    plain = create_model(config.get_config("demo", **TINY))
    assert not any("text" in name or "cross" in name for name in plain.state_dict())
    assert any(name.startswith("text_encoder.") for name in text_model().state_dict())


def test_the_empty_prompt_is_the_null_condition_of_guidance():
    cfg = text_config()
    model = text_model()
    diffusion = create_diffusion(cfg)
    tokens = text.create_tokenizer(cfg)(CAPTIONS[:2])
    empty = text.create_tokenizer(cfg)(["", ""])
    assert torch.equal(diffusion.null_condition(tokens), empty)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 9])
    # No caption is the empty caption.
    torch.testing.assert_close(model(x, t), model(x, t, empty))
    # Guidance w: eps_uncond + w (eps_cond - eps_uncond), the unconditional call made with the empty caption.
    eps_cond, _ = diffusion.model_predictions(model, x, t, tokens)
    eps_uncond, _ = diffusion.model_predictions(model, x, t, empty)
    eps_guided, _ = diffusion.model_predictions(model, x, t, tokens, guidance_scale=3.0)
    torch.testing.assert_close(eps_guided, eps_uncond + 3 * (eps_cond - eps_uncond), atol=1e-4, rtol=1e-4)
    eps_zero, _ = diffusion.model_predictions(model, x, t, tokens, guidance_scale=0.0)
    torch.testing.assert_close(eps_zero, eps_uncond)


def test_training_drops_captions_to_the_empty_one():
    cfg = text_config(cond_drop_prob=0.5)
    diffusion = create_diffusion(cfg)
    seen = []

    def recording_model(x, t, y):
        seen.append(y)
        return torch.zeros_like(x)

    tokens = text.create_tokenizer(cfg)(CAPTIONS * 40)
    torch.manual_seed(0)
    diffusion.training_loss(recording_model, torch.zeros(len(tokens), 3, 16, 16), tokens)
    dropped = (seen[0] == 0).all(dim=1)
    assert torch.equal(seen[0][~dropped], tokens[~dropped])
    assert 0.3 < dropped.float().mean() < 0.7  # 120 draws of p = 0.5: 4.4 standard deviations either way


# --- captioned data ------------------------------------------------------------------------------------

def test_captioned_shapes_say_what_they_show_and_hold_out_pairs_from_training():
    train_set = dataset.CaptionedShapes(train=True, image_size=32, num_images=1000)
    test_set = dataset.CaptionedShapes(train=False, image_size=32, num_images=1000)
    names = [dataset.SHAPES_CLASSES, list(dataset.CAPTION_COLOURS), list(dataset.CAPTION_SIZES),
             list(dataset.CAPTION_POSITIONS), list(dataset.CAPTION_BACKGROUNDS)]
    for caption, row in zip(train_set.captions[:50], train_set.attributes[:50].tolist()):
        assert caption == dataset.shape_caption(*(names[k][index] for k, index in enumerate(row)))
    assert not prompts.held_out(train_set.attributes).any()
    assert 0.1 < prompts.held_out(test_set.attributes).float().mean() < 0.3  # 4 of the 20 pairs
    # What the captions say is in the pictures: colour and position read back by geometry, every one.
    colours, positions = prompts.read_colour_and_position(test_set.images)
    assert torch.equal(colours, test_set.attributes[:, 1])
    assert torch.equal(positions, test_set.attributes[:, 3])
    # ... and the background colour is the one named.
    corner = test_set.images[:, :, 0, 0].float()
    backgrounds = torch.tensor(list(dataset.CAPTION_BACKGROUNDS.values()), dtype=torch.float32)
    assert torch.equal(torch.cdist(corner, backgrounds).argmin(dim=1), test_set.attributes[:, 4])


def test_flipped_training_images_get_mirrored_captions(monkeypatch):
    shapes = dataset.CaptionedShapes(train=True, image_size=32, num_images=64)
    vocabulary = text.build_vocabulary(shapes.captions)
    tokenizer = text.WordTokenizer(vocabulary, 16)
    cfg = config.get_config("demo", text_encoder="transformer", image_size=32, attn_resolutions=(16,),
                            random_flip=True)

    class State:
        epoch = batch_in_epoch = 0

    torch.manual_seed(0)
    batches = [(0, 0, torch.stack([shapes[i][0] for i in range(64)]), shapes.captions)]
    images, tokens = next(train.device_batches(iter(batches), State(), cfg, torch.device("cpu"), tokenizer))
    words = {index + text.FIRST_WORD: word for index, word in enumerate(vocabulary)}
    read_captions = [" ".join(words[i] for i in row if i) for row in tokens.tolist()]
    assert read_captions != [" ".join(text.words(caption)) for caption in shapes.captions]  # some were flipped
    _, positions = prompts.read_colour_and_position(((images + 1) * 127.5).round().to(torch.uint8))
    for caption, position in zip(read_captions, positions.tolist()):
        assert list(dataset.CAPTION_POSITIONS)[position] in caption


def test_mirroring_swaps_left_and_right_in_any_case():
    assert dataset.mirror_caption("Left of a LEFT-handed leftover, at the top right") == (
        "Right of a RIGHT-handed leftover, at the top left")


def write_captioned_folder(root, captions):
    root.mkdir()
    for index, caption in enumerate(captions):
        Image.new("RGB", (16, 16), (40 * index, 0, 0)).save(root / f"{index}.png")
        if caption is not None:
            (root / f"{index}.txt").write_text(caption + "\n")
    return root


def test_folder_captions_from_text_files_and_from_captions_jsonl(tmp_path):
    folder = write_captioned_folder(tmp_path / "txt", ["a red cross", "", "a blue circle"])
    assert dataset.read_captions(str(folder), [str(folder / f"{i}.png") for i in range(3)]) == [
        "a red cross", "", "a blue circle"]
    folder = write_captioned_folder(tmp_path / "jsonl", [None, None])
    lines = [json.dumps({"file_name": "1.png", "text": "second"}), json.dumps({"file_name": "0.png", "text": "first"})]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config.get_config("demo", dataset="folder", data_dir=str(folder), text_encoder="transformer")
    data = dataset.build_dataset(cfg)
    assert data.captions == ["first", "second"] and data[1][1] == "second"


def test_missing_captions_and_bad_caption_lines_are_named(tmp_path):
    folder = write_captioned_folder(tmp_path / "missing", ["a red cross", None])
    with pytest.raises(dataset.DatasetError, match=r"1\.png has no caption.*1\.txt"):
        dataset.read_captions(str(folder), [str(folder / f"{i}.png") for i in range(2)])
    bad_lines = {"not json": "line 2 of", '{"file_name": "1.png", "text": null}': "line 2 of",
                 '{"file_name": "0.png", "text": "y"}': "second caption"}
    for line, message in bad_lines.items():
        (folder / "captions.jsonl").write_text('{"file_name": "0.png", "text": "x"}\n' + line + "\n")
        with pytest.raises(dataset.DatasetError, match=message):
            dataset.read_captions(str(folder), [str(folder / "0.png")])
    (folder / "captions.jsonl").unlink()
    (folder / "1.txt").write_bytes(b"\xff\xfe caption")
    with pytest.raises(dataset.DatasetError, match="not UTF-8"):
        dataset.read_captions(str(folder), [str(folder / f"{i}.png") for i in range(2)])


def test_a_config_conditions_on_labels_or_captions_not_both():
    with pytest.raises(config.ConfigError, match="not both"):
        config.get_config("demo", text_encoder="transformer", num_classes=4)
    with pytest.raises(config.ConfigError, match="captions come with"):
        config.get_config("demo", dataset="mnist", text_encoder="transformer")


# --- a captioned run: training, checkpoint, sampling ------------------------------------------------------

TRAIN_FLAGS = ["--preset", "demo", "--image-size", "16", "--base-channels", "32", "--channel-mults", "1", "2",
               "--attn-resolutions", "8", "--num-heads", "2", "--timesteps", "20", "--text-encoder", "transformer",
               "--text-dim", "32", "--text-layers", "1", "--batch-size", "4", "--num-workers", "0", "--amp", "none",
               "--sample-every", "0", "--log-every", "1", "--warmup-steps", "1", "--time-budget", ""]


def test_vocabulary_is_saved_with_the_run_and_sampling_needs_no_data(in_tmp_dir, capsys):
    folder = write_captioned_folder(in_tmp_dir / "pictures", ["a red cross", "a blue circle", "a red circle",
                                                              "a blue cross on the Left"])
    train.main([*TRAIN_FLAGS, "--dataset", "folder", "--data-dir", str(folder), "--max-steps", "2",
                "--run-name", "words", "--random-flip"])
    saved = config.config_from_dict(utils.load_checkpoint(Path("checkpoints/words/last.pt"))["config"])
    # "right" too: the flipped image of the last caption says it.
    assert saved.vocabulary == ("a", "blue", "circle", "cross", "left", "on", "red", "right", "the")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    written = sample.run(sample.parse_options(["--run-name", "words", "--prompt", "a red cross", "--prompt",
                                               "a blue circle", "--num-samples", "4", "--steps", "2"]))
    labelled = Image.open(written[0])
    assert labelled.height == 2 * 18 + 2 and labelled.width > 2 * 18 + 2  # two rows, a margin with the prompts
    written = sample.run(sample.parse_options(["--run-name", "words", "--prompt", "a red cross", "--prompt",
                                               "a blue circle", "--num-samples", "4", "--steps", "2",
                                               "--format", "npz"]))
    assert np.load(written[0])["arr_1"].tolist() == ["a red cross"] * 2 + ["a blue circle"] * 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.main(["--run-name", "words", "--prompt", "a green cross", "--steps", "2"])
    assert capsys.readouterr().err.startswith("error: the word 'green' of 'a green cross' is not in this model's")


def test_prompts_split_the_samples_and_come_from_a_file_too(in_tmp_dir):
    (in_tmp_dir / "prompts.txt").write_text("a red cross\n\na blue circle\n")
    opts = sample.parse_options(["--prompt", "a green square", "--prompt-file", "prompts.txt", "--num-samples", "7"])
    cfg = config.get_config("demo", text_encoder="transformer",
                            vocabulary=text.build_vocabulary(["a red cross", "a blue circle", "a green square"]))
    rows, tokens, per_prompt = sample.prompt_tokens(cfg, opts, text.create_tokenizer(cfg))
    assert rows == ["a green square", "a red cross", "a blue circle"] and per_prompt == 2
    expected = text.create_tokenizer(cfg)([prompt for prompt in rows for _ in range(2)])
    assert torch.equal(tokens, expected)


def test_each_prompt_flag_takes_one_prompt_and_no_prompt_is_a_square_grid(capsys):
    with pytest.raises(SystemExit):
        sample.parse_options(["--prompt", "a", "green", "square"])  # unquoted: not three prompts
    assert "unrecognized arguments: green square" in capsys.readouterr().err
    cfg = config.get_config("demo", text_encoder="transformer", vocabulary=("a", "square"))
    rows, tokens, row_length = sample.prompt_tokens(cfg, sample.parse_options(["--num-samples", "16"]),
                                                    text.create_tokenizer(cfg))
    assert rows == [""] and row_length == 4 and tokens.eq(0).all()


def test_prompts_for_a_model_without_captions_are_refused():
    cfg = config.get_config("demo")
    with pytest.raises(utils.UsageError, match="without captions"):
        sample.check_against_model(sample.parse_options(["--prompt", "a red cross"]), cfg)


def test_a_captioned_run_resumes_bit_for_bit(in_tmp_dir, monkeypatch):
    flags = [*TRAIN_FLAGS, "--dataset", "shapes", "--max-steps", "4", "--save-every", "2", "--random-flip"]
    train.main([*flags, "--run-name", "straight"])
    with monkeypatch.context() as patch:
        stop_at_loss_call(patch, 2)  # SIGTERM during step 2: the run saves and stops
        train.main([*flags, "--run-name", "split"])
    assert utils.load_checkpoint(Path("checkpoints/split/last.pt"))["step"] == 2
    train.main([*flags, "--run-name", "split"])
    straight = utils.load_checkpoint(Path("checkpoints/straight/last.pt"))
    resumed = utils.load_checkpoint(Path("checkpoints/split/last.pt"))
    assert resumed["step"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name


# --- prompt accuracy ------------------------------------------------------------------------------------

def test_prompt_accuracy_counts_all_three_attributes_and_splits_seen_from_held_out():
    colours = list(dataset.CAPTION_COLOURS)
    # shape, colour, size, position, background: a seen pair (circle, red) and a held-out one (cross, red).
    asked = torch.tensor([[0, colours.index("red"), 0, 1, 0], [3, colours.index("red"), 1, 4, 2]])
    read = torch.stack([asked[:, 0], asked[:, 1], asked[:, 3]], dim=1)
    assert prompts.prompt_accuracy(read, asked)["prompt_accuracy"] == 1.0
    wrong_position = read.clone()
    wrong_position[1, 2] = 0
    scores = prompts.prompt_accuracy(wrong_position, asked)
    assert scores["prompt_accuracy"] == 0.5 and scores["prompt_accuracy_seen"] == 1.0
    assert scores["prompt_accuracy_held_out"] == 0.0
    assert scores["shape_accuracy"] == 1.0 and scores["position_accuracy"] == 0.5


def test_a_blank_image_has_no_colour_or_position():
    colours, positions = prompts.read_colour_and_position(torch.full((1, 3, 16, 16), 128, dtype=torch.uint8))
    assert colours.item() == -1 and positions.item() == -1


# --- CLIP: the optional pretrained encoder, wired with a tiny random one -------------------------------------

def tiny_clip(folder):
    """A randomly initialised CLIP text model of 1 layer and a character-level tokenizer, saved in `folder`."""
    transformers = reference_library("transformers")
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {**{c: i for i, c in enumerate(letters)}, **{c + "</w>": 26 + i for i, c in enumerate(letters)},
             "<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    clip_config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                              bos_token_id=52, eos_token_id=53, pad_token_id=53)
    torch.manual_seed(0)
    transformers.CLIPTextModel(clip_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clip_encoder_is_frozen_cached_and_kept_out_of_the_checkpoint(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    cfg = config.get_config("demo", **{**TINY, "text_encoder": "clip", "text_model": str(folder),
                                       "max_caption_length": 24})
    torch.manual_seed(0)
    model = randomise_zero_layers_(create_model(cfg)).eval()
    assert not any("clip" in name for name in model.state_dict())
    tokenizer = text.create_tokenizer(cfg, model.text_encoder)
    tokens = tokenizer(["a red cross", "", "a red cross"])
    assert tokens[1].eq(0).all() and tokens[0, 0] == 52 + 1  # CLIP's start token, shifted so 0 is padding
    encoder = model.text_encoder
    features, mask = encoder(tokens)
    # The CLIP model's own features of the caption; the empty caption is CLIP's start and end tokens.
    direct = encoder.clip(input_ids=torch.tensor([tokenizer.tokenizer("a red cross")["input_ids"]])).last_hidden_state
    torch.testing.assert_close(features[0, :direct.shape[1]], direct[0])
    assert mask[1].tolist()[:3] == [True, True, False]
    assert torch.equal(features[0], features[2]) and len(encoder.cache) == 2
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.tensor([1, 2, 3]), tokens)
    assert not torch.allclose(out[0], model(x, torch.tensor([1, 2, 3]), tokenizer(["a blue circle"] * 3))[0])
    assert all(not p.requires_grad for p in encoder.clip.parameters())
    # No caption at all (model(x_t, t)) is the empty caption, the null condition, as for every encoder.
    torch.testing.assert_close(model(x, torch.tensor([1, 2, 3])), model(x, torch.tensor([1, 2, 3]),
                                                                        tokenizer(["", "", ""])))
    with pytest.raises(text.TextError, match="more than the 32 tokens"):
        create_model(config.get_config("demo", **{**TINY, "text_encoder": "clip", "text_model": str(folder),
                                                  "max_caption_length": 40}))


def test_a_clip_model_that_cannot_be_loaded_is_one_sentence(tmp_path):
    reference_library("transformers")
    cfg = config.get_config("demo", **{**TINY, "text_encoder": "clip", "text_model": str(tmp_path / "nothing")})
    with pytest.raises(text.TextError, match="huggingface-cli download"):
        create_model(cfg)


def test_a_captioned_teacher_distils_with_its_captions(in_tmp_dir, monkeypatch):
    flags = [*TRAIN_FLAGS, "--dataset", "shapes"]
    train.main([*flags, "--max-steps", "2", "--run-name", "teacher"])
    seen = []
    original = train.ProgressiveDistillation.training_loss

    def recording_loss(self, model, x0, y=None, **kwargs):
        seen.append(y)
        return original(self, model, x0, y, **kwargs)

    monkeypatch.setattr(train.ProgressiveDistillation, "training_loss", recording_loss)
    train.main([*flags, "--max-steps", "2", "--run-name", "student", "--teacher", "checkpoints/teacher/last.pt",
                "--student-steps", "2"])
    teacher_cfg = config.config_from_dict(utils.load_checkpoint(Path("checkpoints/teacher/last.pt"))["config"])
    student_cfg = config.config_from_dict(utils.load_checkpoint(Path("checkpoints/student/last.pt"))["config"])
    assert student_cfg.vocabulary == teacher_cfg.vocabulary and student_cfg.text_encoder == "transformer"
    assert len(seen) == 2 and seen[0].shape == (4, teacher_cfg.max_caption_length) and seen[0].any()


def test_the_shape_classifier_of_captioned_shapes_learns_from_every_pair():
    import quality
    cfg = config.get_config("demo", text_encoder="transformer", image_size=16)
    images, labels, test_images, test_labels, names = quality.load_splits(cfg)
    assert names == dataset.SHAPES_CLASSES and len(images) == 10_000 and len(test_images) == 2_000
    # Trained without the held-out pairs, a classifier would take colour for a sign of shape.
    _, _, attributes = dataset.make_captioned_shapes(100, 16, dataset.CAPTIONED_CLASSIFIER_SEED, held_out=True)
    assert torch.equal(labels[:100], attributes[:, 0]) and prompts.held_out(attributes).any()
    # A different draw from the training split's.
    assert not torch.equal(images[:100], dataset.CaptionedShapes(train=True, image_size=16, num_images=100).images)
