"""Textual-inversion files as A1111, kohya and diffusers write them: loaded on a pipeline they give the prompt
embeddings diffusers' own `load_textual_inversion` gives; what we write, we and diffusers read; bad files say why."""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.conditioning.embeddings import token_vectors
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.formats.embeddings import read_embedding, write_embedding
from latent_diffusion.pipeline import Pipeline

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")

WIDTH = TINY_SD1[1].width
FAMILIES = {"sd1": TINY_SD1,  # OpenAI CLIP: quick-GELU, padded with the end token
            "sd2": (TINY_SD1[0], dataclasses.replace(TINY_SD1[1], hidden_act="gelu", pad_token_id=0))}  # OpenCLIP
PROMPTS = ["a retro-style photo of a cat", "retro-style, a <cat-toy> on a retro-style table",
           "<cat-toy><cat-toy> and a dog, retro-style.", "a photo of a cat"]  # no "!": transformers pads SD 2.x with it


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    """A tiny random SD 1.x- or SD 2.x-like model written as a diffusers folder."""
    folder = tmp_path_factory.mktemp(request.param)
    write_diffusers(tiny_original_parts(FAMILIES[request.param]), folder)
    return folder


def pipelines(folder):
    """(ours, diffusers') pipelines of `folder`, fresh (loading embeddings changes them)."""
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(folder, device="cpu"), theirs


def prompt_embeddings(pipe, prompt: str) -> torch.Tensor:
    """(1, 77, D) text-encoder states of `prompt` in our pipeline or in diffusers'."""
    if isinstance(pipe, Pipeline):
        return pipe.conditioner.encode_prompts([prompt]).tokens
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def vectors(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path, v: torch.Tensor, name: str) -> None:
    """What A1111's `Embedding.save` writes (its vector a tensor that was trained: requires_grad)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone().requires_grad_()}, "name": name,
                "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "model"}, path)


# (file name, writer, the token diffusers must be told: A1111 files name none it reads)
FILES = {
    "a1111_pt": ("retro-style.pt", lambda p, v: write_a1111_pt(p, v, "retro-style"), None),
    "a1111_safetensors": ("retro-style.safetensors", lambda p, v: save_file({"emb_params": v}, p), "retro-style"),
    "diffusers_safetensors": ("learned_embeds.safetensors", lambda p, v: save_file({"retro-style": v[0]}, p), None),
    "diffusers_bin": ("learned_embeds.bin", lambda p, v: torch.save({"retro-style": v}, p), None),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_prompt_embeddings_match_diffusers_load_textual_inversion(kind, folder, tmp_path):
    """One embedding of each kind (3 vectors, or 1 for a diffusers (D,) file) and a second, multi-vector one:
    triggers mid-sentence, twice, side by side, next to punctuation, and a prompt without any."""
    name, write, their_token = FILES[kind]
    (tmp_path / "a").mkdir()
    write(tmp_path / "a" / name, vectors(3, seed=1))
    save_file({"<cat-toy>": vectors(2, seed=2)}, tmp_path / "cat-toy.safetensors")
    ours, theirs = pipelines(folder)
    assert ours.load_embedding(tmp_path / "a" / name) == "retro-style"
    assert ours.load_embedding(tmp_path / "cat-toy.safetensors") == "<cat-toy>"
    theirs.load_textual_inversion(str(tmp_path / "a" / name), token=their_token)
    theirs.load_textual_inversion(str(tmp_path / "cat-toy.safetensors"))
    for prompt in PROMPTS:
        got, expected = prompt_embeddings(ours, prompt), prompt_embeddings(theirs, prompt)
        assert (got - expected).abs().max() <= 1e-5, prompt


def test_unloading_gives_the_same_prompt_embeddings_and_identity_as_before(folder, tmp_path):
    ours, _ = pipelines(folder)
    encoder = ours.conditioner.encoder
    before, identity = prompt_embeddings(ours, PROMPTS[1]), encoder.identity()
    ours.conditioner.cache_frozen(tmp_path / "cache")
    write_embedding(tmp_path / "retro-style.pt", "retro-style", vectors(2))
    ours.load_embedding(tmp_path / "retro-style.pt")
    assert encoder.identity() != identity
    assert ours.conditioner.frozen.folder.name == encoder.identity()  # the cache is keyed anew
    assert not torch.equal(prompt_embeddings(ours, PROMPTS[1]), before)
    ours.unload_embeddings()
    assert torch.equal(prompt_embeddings(ours, PROMPTS[1]), before)
    assert encoder.identity() == identity and token_vectors(encoder) is None


def test_what_we_write_we_and_diffusers_read(folder, tmp_path):
    """Each format and suffix the writer knows, written atomically, read back exactly, and loaded by diffusers."""
    ours, theirs = pipelines(folder)
    written = {}
    for k, (fmt, suffix) in enumerate([("a1111", ".safetensors"), ("a1111", ".pt"), ("diffusers", ".safetensors"),
                                       ("diffusers", ".bin")]):
        token, v = f"<thing-{k}>", vectors(k + 1, seed=k)
        path = write_embedding(tmp_path / f"thing-{k}{suffix}", token, v, fmt, step=7)
        again = read_embedding(path)
        assert again.token == (f"thing-{k}" if fmt == "a1111" else token)  # A1111 names it after the file
        assert torch.equal(again.vectors, v)
        ours.load_embedding(path, token=token)
        theirs.load_textual_inversion(str(path), token=token)
        written[path.name] = fmt
    assert sorted(os.listdir(tmp_path)) == sorted(written)  # written atomically: no temporary file left
    stored = torch.load(tmp_path / "thing-1.pt", weights_only=True)
    assert stored.keys() == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                             "sd_checkpoint_name"}
    assert (stored["name"], stored["step"], list(stored["string_to_param"])) == ("<thing-1>", 7, ["*"])
    prompt = "<thing-0> <thing-1> and <thing-2> on a table, <thing-3> <thing-1>"
    assert (prompt_embeddings(ours, prompt) - prompt_embeddings(theirs, prompt)).abs().max() <= 1e-5


def test_the_trigger_word_comes_from_the_token_given_the_file_or_its_name(tmp_path):
    save_file({"<cat-toy>": vectors(1)[0]}, tmp_path / "learned_embeds.safetensors")
    assert read_embedding(tmp_path).token == "<cat-toy>"  # a diffusers folder
    assert read_embedding(tmp_path / "learned_embeds.safetensors", token="<toy>").token == "<toy>"
    write_a1111_pt(tmp_path / "charturner.pt", vectors(2), "something else")
    embedding = read_embedding(tmp_path / "charturner.pt")
    assert embedding.token == "charturner" and embedding.vectors.shape == (2, WIDTH)
    assert embedding.vectors.dtype == torch.float32 and not embedding.vectors.requires_grad
    torch.save(vectors(2), tmp_path / "bare.pt")  # diffusers' loader takes a bare tensor with a token
    assert read_embedding(tmp_path / "bare.pt", token="<bare>").token == "<bare>"


class RunsCode:
    """A pickle payload that would create a folder when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_bad_files_are_one_clear_error(tmp_path):
    cases = {
        "sdxl.safetensors": ({"clip_l": vectors(2, width=768), "clip_g": vectors(2, width=1280)}, "SDXL embedding"),
        "two.safetensors": ({"a": vectors(1), "b": vectors(1)}, r"holds 2 entries \(a, b\)"),
        "none.safetensors": ({}, "holds no tensors"),
        "ints.safetensors": ({"emb_params": torch.ones(2, WIDTH, dtype=torch.int64)}, "int64 tensor"),
        "nan.safetensors": ({"emb_params": torch.full((2, WIDTH), float("nan"))}, "NaN"),
        "flat.safetensors": ({"emb_params": torch.zeros(2, 3, WIDTH)}, r"shape \(2, 3, 64\)"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            read_embedding(tmp_path / name)
    marker = tmp_path / "code-ran"
    torch.save({"string_to_param": {"*": RunsCode(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_embedding(tmp_path / "empty.pt")
    torch.save(vectors(1), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare tensor with no trigger word"):
        read_embedding(tmp_path / "bare.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="expected learned_embeds.safetensors or learned_embeds.bin"):
        read_embedding(tmp_path / "folder")
    ours = Pipeline.from_parts(tiny_original_parts(TINY_SD1), device="cpu")
    save_file({"emb_params": vectors(2, width=768)}, tmp_path / "sd1-style.safetensors")
    with pytest.raises(ValueError, match=r"sd1-style\.safetensors: a 768-wide embedding \(SD 1\.x\) for a 64-wide "
                                         "text encoder: an embedding works only with the kind of text encoder"):
        ours.load_embedding(tmp_path / "sd1-style.safetensors")
    assert token_vectors(ours.conditioner.encoder) is None


def test_writer_refuses_what_the_tools_would_not_read(tmp_path):
    with pytest.raises(ValueError, match=r"a diffusers embedding is written as \.safetensors or \.bin"):
        write_embedding(tmp_path / "x.pt", "<x>", vectors(1), "diffusers")
    with pytest.raises(ValueError, match="fmt = 'comfy'"):
        write_embedding(tmp_path / "x.safetensors", "<x>", vectors(1), "comfy")
    with pytest.raises(CheckpointError, match="NaN"):
        write_embedding(tmp_path / "x.safetensors", "<x>", torch.full((1, WIDTH), float("nan")))
    assert not list(tmp_path.iterdir())
